"""The official NExT-GPT delta: a tiny random `pytorch_model.pt` laid out like the release
(peft LoRA names under llama_model.base_model.model., resized embed_tokens / lm_head,
llama_proj, three output projections) converts to safetensors and merges into a base
LLaMA; the merged model matches a peft-style unmerged forward."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minignext import weights
from minignext.llama import Llama
from minignext.systems.nextgpt_checkpoint import apply_delta, convert_delta, delta_key
from minignext.projection import OutputProjection, OutputProjectionConfig

BASE_VOCAB, NEW_TOKENS, RANK, ALPHA = 96, 10, 4, 32


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def official_delta(hidden=64, layers=2, peft_adapter_name=False):
    """A state dict with the key names and shapes of ChocoWu/nextgpt_7b_tiva_v0/pytorch_model.pt."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    pre = "llama_model.base_model.model."
    ad = ".default" if peft_adapter_name else ""
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{pre}model.layers.{i}.self_attn.{name}.lora_A{ad}.weight"] = torch.randn(RANK, hidden, generator=g) * 0.1
            sd[f"{pre}model.layers.{i}.self_attn.{name}.lora_B{ad}.weight"] = torch.randn(hidden, RANK, generator=g) * 0.1
    vocab = BASE_VOCAB + NEW_TOKENS
    sd[f"{pre}model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=g) * 0.02
    sd[f"{pre}lm_head.weight"] = torch.randn(vocab, hidden, generator=g) * 0.02
    sd["llama_proj.weight"] = torch.randn(hidden, 32, generator=g)
    sd["llama_proj.bias"] = torch.randn(hidden, generator=g)
    for prefix, out in [("gen_text_hidden_fcs", 24), ("gen_text_hidden_fcs_video", 24), ("gen_text_hidden_fcs_audio", 16)]:
        proj = OutputProjection(OutputProjectionConfig.tiny(in_dim=hidden, out_dim=out))
        sd.update({f"{prefix}.0.{k}": v for k, v in proj.state_dict().items()})
    return sd


def unmerged_forward(base_dir, delta, ids):
    """What peft computes without merging: y = W x + (alpha / r) B A x on q, k, v, o."""
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    pre = "llama_model.base_model.model."
    hf.resize_token_embeddings(BASE_VOCAB + NEW_TOKENS)
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(delta[f"{pre}model.embed_tokens.weight"])
        hf.lm_head.weight.copy_(delta[f"{pre}lm_head.weight"])
    for i, layer in enumerate(hf.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            a = next(v for k, v in delta.items() if f"layers.{i}.self_attn.{name}.lora_A" in k)
            b = next(v for k, v in delta.items() if f"layers.{i}.self_attn.{name}.lora_B" in k)
            getattr(layer.self_attn, name).register_forward_hook(
                lambda mod, inp, out, a=a, b=b: out + (ALPHA / RANK) * (inp[0] @ a.T @ b.T))
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("adapter_name", [False, True], ids=["lora_A.weight", "lora_A.default.weight"])
def test_delta_converts_merges_and_matches_unmerged_lora(base_dir, tmp_path, adapter_name):
    delta = official_delta(peft_adapter_name=adapter_name)
    torch.save(delta, tmp_path / "pytorch_model.pt")
    out = convert_delta(tmp_path / "pytorch_model.pt", tmp_path / "converted")
    assert out == tmp_path / "converted" / "delta.safetensors"
    converted = weights.load_safetensors(out)
    assert "llama_model.model.layers.1.self_attn.o_proj.lora_B.weight" in converted
    assert "llama_model.model.embed_tokens.weight" in converted and "llama_proj.bias" in converted
    assert "gen_text_hidden_fcs_audio.0.tfm.decoder.layers.1.norm3.weight" in converted
    with pytest.raises(FileExistsError):
        convert_delta(tmp_path / "pytorch_model.pt", tmp_path / "converted")

    llm = Llama.from_pretrained(base_dir)
    rest = apply_delta(llm, converted, lora_alpha=ALPHA)
    assert llm.config.vocab_size == BASE_VOCAB + NEW_TOKENS
    assert all(not k.startswith("llama_model.") for k in rest) and "gen_text_hidden_fcs.0.fc.weight" in rest

    ids = torch.randint(0, BASE_VOCAB + NEW_TOKENS, (2, 12), generator=torch.Generator().manual_seed(2))
    expected = unmerged_forward(base_dir, delta, ids)
    with torch.no_grad():
        got = llm(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the LoRA really changed the model: the base weights alone disagree
    with torch.no_grad():
        plain = Llama.from_pretrained(base_dir)
        plain.resize_token_embeddings(BASE_VOCAB + NEW_TOKENS)
        plain.model.embed_tokens.weight.copy_(llm.model.embed_tokens.weight)
        plain.lm_head.weight.copy_(llm.lm_head.weight)
        assert (plain(ids) - expected).abs().max() > 1e-3


def test_delta_key_table():
    t = torch.zeros(1)
    assert delta_key("llama_model.base_model.model.model.layers.3.self_attn.v_proj.lora_B.default.weight", t) == \
        [("llama_model.model.layers.3.self_attn.v_proj.lora_B.weight", t)]
    assert delta_key("gen_text_hidden_fcs_video.0.query_embs", t) == [("gen_text_hidden_fcs_video.0.query_embs", t)]
    with pytest.raises(weights.WeightsError, match="unexpected key"):
        delta_key("visual_encoder.trunk.blocks.0.weight", t)


def test_unreadable_delta_is_a_weights_error(tmp_path):
    bad = tmp_path / "pytorch_model.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(weights.WeightsError, match="weights_only"):
        convert_delta(bad, tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    (lambda d, k: d.pop(k.replace("lora_A", "lora_B")), "lora_A.weight has no lora_B partner"),
    (lambda d, k: d.pop(k), "lora_B.weight has no lora_A partner"),
    (lambda d, k: d.update({k.replace("lora_A", "lora_A_old"): d.pop(k)}), "lora_A_old.weight is not"),
    (lambda d, k: d.update({k.replace("layers.0", "layers.7"): d.pop(k)}), "layers.7.self_attn.q_proj.lora_A"),
], ids=["A without B", "B without A", "renamed factor", "renamed layer"])
def test_every_lora_factor_needs_its_partner_and_a_layer(base_dir, change, message):
    """A LoRA factor the merge would skip is an error, never a silently unmerged layer."""
    delta = dict(delta_key(k, v)[0] for k, v in official_delta().items())
    change(delta, "llama_model.model.layers.0.self_attn.q_proj.lora_A.weight")
    with pytest.raises(weights.WeightsError, match=message):
        apply_delta(Llama.from_pretrained(base_dir), delta, lora_alpha=ALPHA)
