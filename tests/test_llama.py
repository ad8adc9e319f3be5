"""LLaMA parity with transformers' LlamaForCausalLM on tiny random models, saved with
save_pretrained and loaded through minignext's own loader."""

import json

import pytest
import torch

from minignext.generation import generate
from minignext.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6)
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "theta": dict(num_key_value_heads=2, rope_theta=500.0),
}


def save_hf(tmp_path, name, seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**BASE, **CONFIGS.get(name, {}), **overrides})
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms so that a missing weight would show
        for n, p in hf.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                p.normal_(1.0, 0.2)
    folder = tmp_path / name
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf, folder = save_hf(tmp_path_factory.mktemp("llama"), request.param)
    return hf, Llama.from_pretrained(folder), request.param


def test_config_reads_rope_theta_from_both_places():
    top = LlamaConfig.from_hf({**BASE, "rope_theta": 123.0})
    nested = LlamaConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 321.0}})
    assert (top.rope_theta, nested.rope_theta) == (123.0, 321.0)
    assert nested.num_key_value_heads == 4 and nested.head_dim == 8
    given = {**BASE, "rope_theta": 123.0, "torch_dtype": "float32", "architectures": ["LlamaForCausalLM"]}
    frozen = json.dumps(given)
    assert LlamaConfig.from_hf(given).rope_theta == 123.0 and json.dumps(given) == frozen   # not mutated
    early = {k: v for k, v in BASE.items() if k != "max_position_embeddings"} | {"max_sequence_length": 2048}
    assert LlamaConfig.from_hf(early).max_position_embeddings == 2048      # 2023-era LLaMA/Vicuna files
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_theta_lands_in_rope_parameters_and_is_read(tmp_path):
    _, folder = save_hf(tmp_path, "theta")
    saved = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == 500.0
    assert Llama.from_pretrained(folder).config.rope_theta == 500.0


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        logits, hidden = ours(ids, return_hidden=True)
    torch.testing.assert_close(hidden, ref.hidden_states[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)


def test_stage_by_stage(pair):
    """Embeddings, every decoder layer and the final norm, compared one by one."""
    hf, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(2))
    caught = []
    hooks = [layer.register_forward_hook(lambda m, a, out: caught.append(out[0] if isinstance(out, tuple) else out))
             for layer in ours.model.layers]
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states
        ours(ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(ours.embed(ids), ref[0], atol=0, rtol=0)
    for i, out in enumerate(caught[:-1]):
        torch.testing.assert_close(out, ref[i + 1], atol=1e-5, rtol=0, msg=lambda m: f"layer {i}: {m}")


def test_inputs_embeds_equals_ids(pair):
    _, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs_embeds=ours.embed(ids)), ours(ids), atol=0, rtol=0)


def test_greedy_32_tokens_match_hf_generate(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    out = generate(ours, ids, max_new_tokens=32, stop_token_ids=[], progress=False)
    assert out.shape == ref.shape == (1, 39)
    assert out.tolist() == ref.tolist()


def test_kv_cache_decoding_equals_full_forward(pair):
    _, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(2, 32)
        try:
            steps = [ours(ids[:, :10], input_pos=0)]                       # prefill
            steps += [ours(ids[:, t:t + 1], input_pos=t) for t in range(10, 20)]
            steps += [ours(ids[:, 20:], input_pos=torch.arange(20, 24))]  # a chunk after the prefix
        finally:
            ours.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_bf16_runs_close_to_fp32(tmp_path):
    hf, folder = save_hf(tmp_path, "gqa")
    ours = Llama.from_pretrained(folder, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, BASE["vocab_size"], (1, 12))
    with torch.no_grad():
        logits = ours(ids)
        ref = hf(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - ref).abs().max() < 0.1
    out = generate(ours, ids, max_new_tokens=5, stop_token_ids=[], progress=False)
    assert out.shape == (1, 17)


def test_tied_embeddings_share_one_tensor(tmp_path):
    _, folder = save_hf(tmp_path, "mqa-tied")
    ours = Llama.from_pretrained(folder)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert Llama(LlamaConfig.tiny(tie_word_embeddings=True)).lm_head.weight is not None


def test_prompt_longer_than_positions_is_a_clear_error():
    model = Llama(LlamaConfig.tiny(max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, 17)


def test_bad_forward_arguments():
    model = Llama(LlamaConfig.tiny())
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 5))


def test_padding_mask_matches_hf(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False                       # right padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.long()).logits
        logits = ours(ids, attention_mask=mask)
    torch.testing.assert_close(logits[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, :6], ref[1, :6], atol=1e-5, rtol=0)


def test_resize_token_embeddings():
    torch.manual_seed(0)
    for tied in (False, True):
        model = Llama(LlamaConfig.tiny(vocab_size=50, tie_word_embeddings=tied))
        old_embed = model.model.embed_tokens.weight.detach().clone()
        old_head = model.lm_head.weight.detach().clone()
        new = model.resize_token_embeddings(58)
        assert new == range(50, 58) and model.config.vocab_size == 58
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        assert emb.shape == head.shape == (58, 64)
        torch.testing.assert_close(emb[:50], old_embed, atol=0, rtol=0)
        torch.testing.assert_close(emb[50:], old_embed.mean(0).expand(8, -1), atol=1e-6, rtol=0)
        torch.testing.assert_close(head[50:], old_head.mean(0).expand(8, -1), atol=1e-6, rtol=0)
        assert (head is emb) == tied
        assert model(torch.tensor([[57, 3]])).shape == (1, 2, 58)


def test_vicuna_preset():
    c = LlamaConfig.vicuna_7b()
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.head_dim) == (4096, 32, 32, 128)
    with torch.device("meta"):
        n = sum(p.numel() for p in Llama(c).parameters())
    assert 6.6e9 < n < 6.8e9


def test_real_vicuna_checkpoint_fits_if_present():
    """With the real Vicuna-7B-v0 folder in place, every key and shape fits (headers only)."""
    from safetensors import safe_open

    from minignext import weights
    folder = weights.WEIGHTS_DIR / "real" / "nextgpt-7b" / "vicuna-7b-v0"
    if not (folder / "config.json").is_file():
        pytest.skip(f"no Vicuna-7B-v0 at {folder} (see README: real checkpoints)")
    config = LlamaConfig.from_hf(weights.read_config(folder))
    shapes = {}
    for file in weights.safetensors_files(folder):
        with safe_open(file, framework="pt") as f:
            shapes.update({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})
    if config.tie_word_embeddings:
        shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])
    weights.check_state_dict(weights.build_on_meta(Llama, config).state_dict(), shapes)
