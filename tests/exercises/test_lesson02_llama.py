"""Lesson 2: RMSNorm, RoPE and one KV-cache step, checked against transformers' own
LLaMA functions and against direct formulas."""

import math

import pytest
import torch

from conftest import check

LESSON = "lesson02_llama"
LAYERNORM = "you subtracted the mean: that is LayerNorm; RMSNorm only divides by the root mean square"
INTERLEAVED = ("you rotated neighbouring pairs (x_0, x_1), (x_2, x_3), ... (the GPT-J / Meta layout); "
               "this model pairs x_i with x_(i+D/2) (rotate-half)")
NOT_IN_PLACE = ("the cache was not written in place: assign into a slice of the preallocated cache "
                "instead of building a new tensor (torch.cat allocates one every step)")


def layer_norm_like(x, w, eps):
    x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * w


def interleaved_rope(x, cos, sin):
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., : x.shape[-1] // 2], sin[..., : x.shape[-1] // 2]
    return torch.stack([a * c - b * s, b * c + a * s], -1).flatten(-2)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rope_angles(t, d, theta=10000.0, offset=0):
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = (torch.arange(offset, offset + t, dtype=torch.float64)[:, None] * inv).float()
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def test_rms_norm_matches_formula(ex):
    x, w = randn(2, 5, 16), randn(16, seed=1)
    want = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * w
    check(ex.rms_norm(x, w, 1e-5), want, "rms_norm vs x / sqrt(mean(x^2) + eps) * w",
          wrong=[(LAYERNORM, layer_norm_like(x, w, 1e-5))], atol=1e-5, rtol=1e-5)


def test_rms_norm_matches_transformers(ex):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    ref = llama.LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(randn(16, seed=2))
        for dtype in (torch.float32, torch.bfloat16):
            x = (randn(3, 4, 16, seed=3) * 4).to(dtype)
            out = ex.rms_norm(x, ref.weight, 1e-6)
            assert out.dtype == ref(x).dtype, f"for {dtype} input the result must be {ref(x).dtype}, got {out.dtype}"
            check(out, ref(x), f"rms_norm vs transformers' LlamaRMSNorm on {dtype}", atol=1e-5, rtol=1e-5)


def test_apply_rope_matches_transformers(ex):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = randn(2, 4, 7, 8, seed=4), randn(2, 2, 7, 8, seed=5)      # GQA: fewer key heads
    cos, sin = rope_angles(7, 8)
    want_q, want_k = llama.apply_rotary_pos_emb(q, k, cos[None], sin[None], unsqueeze_dim=1)
    got_q, got_k = ex.apply_rope(q, k, cos, sin)
    check(got_q, want_q, "rotated q vs transformers' apply_rotary_pos_emb",
          wrong=[(INTERLEAVED, interleaved_rope(q, cos, sin))], atol=1e-6, rtol=0)
    check(got_k, want_k, "rotated k (fewer heads than q) vs transformers' apply_rotary_pos_emb", atol=1e-6, rtol=0)


def test_apply_rope_rotates_half_pairs(ex):
    d = 6
    q = randn(1, 1, 1, d, seed=6)
    a = torch.tensor([[0.3, -1.1, 2.0]])
    cos, sin = torch.cat([a.cos(), a.cos()], -1), torch.cat([a.sin(), a.sin()], -1)
    got, _ = ex.apply_rope(q, q.clone(), cos, sin)
    x1, x2 = q[..., :3], q[..., 3:]
    want = torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()], -1)   # 2-D rotations
    check(got, want, "apply_rope vs the 2-D rotation of each (x_i, x_(i+D/2)) pair",
          wrong=[(INTERLEAVED, interleaved_rope(q, cos, sin))], atol=1e-6, rtol=0)
    check(got.norm(), q.norm(), "the norm of a rotated vector (a rotation keeps lengths)", atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_distance(ex):
    """RoFormer's point: <R(m) q, R(n) k> is a function of m - n."""
    q, k = randn(1, 1, 1, 16, seed=7), randn(1, 1, 1, 16, seed=8)
    scores = []
    for m, n in [(5, 2), (9, 6), (40, 37)]:
        cm, sm = rope_angles(1, 16, offset=m)
        cn, sn = rope_angles(1, 16, offset=n)
        qm, _ = ex.apply_rope(q, q, cm, sm)
        _, kn = ex.apply_rope(k, k, cn, sn)
        scores.append(float((qm * kn).sum()))
    assert math.isclose(scores[0], scores[1], abs_tol=1e-4) and math.isclose(scores[0], scores[2], abs_tol=1e-4), \
        f"q.k after RoPE must depend only on the distance m - n (3 for all three pairs), got {scores}"
    c0, s0 = rope_angles(1, 16, offset=0)
    c1, s1 = rope_angles(1, 16, offset=1)
    assert abs(float((ex.apply_rope(q, q, c0, s0)[0] * ex.apply_rope(k, k, c1, s1)[1]).sum()) - scores[0]) > 1e-3


def test_kv_cache_update_in_place_equals_concatenation(ex):
    cache_k, cache_v = torch.zeros(2, 3, 10, 4), torch.zeros(2, 3, 10, 4)
    ptr_k, ptr_v = cache_k.data_ptr(), cache_v.data_ptr()
    chunks = [(randn(2, 3, t, 4, seed=10 + i), randn(2, 3, t, 4, seed=20 + i)) for i, t in enumerate([4, 1, 1, 2])]
    start = 0
    for i, (k, v) in enumerate(chunks):
        keys, values = ex.kv_cache_update(cache_k, cache_v, k, v, start)
        start += k.shape[2]
        want_k = torch.cat([c[0] for c in chunks[:i + 1]], dim=2)      # what a growing cache would hold
        want_v = torch.cat([c[1] for c in chunks[:i + 1]], dim=2)
        check(keys, want_k, f"keys returned after step {i}", atol=0, rtol=0)
        check(values, want_v, f"values returned after step {i}", atol=0, rtol=0)
        if not torch.equal(cache_k[:, :, :start], want_k) or keys.data_ptr() != ptr_k:
            pytest.fail(NOT_IN_PLACE, pytrace=False)
    assert cache_k.data_ptr() == ptr_k and cache_v.data_ptr() == ptr_v, NOT_IN_PLACE
    assert (cache_k[:, :, start:] == 0).all() and (cache_v[:, :, start:] == 0).all()


def test_kv_cache_decoding_gives_the_full_attention(ex):
    """Attending with the cached keys one query at a time equals causal attention over all."""
    q, k, v = randn(1, 2, 6, 8, seed=30), randn(1, 2, 6, 8, seed=31), randn(1, 2, 6, 8, seed=32)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    cache_k, cache_v = torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8)
    outs = []
    for t in range(6):
        keys, values = ex.kv_cache_update(cache_k, cache_v, k[:, :, t:t + 1], v[:, :, t:t + 1], t)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, t:t + 1], keys, values))
    check(torch.cat(outs, dim=2), full, "one query at a time over the cache vs causal attention over all",
          atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads, theta", [(4, 10000.0), (2, 500.0), (1, 1e6)])
def test_llama_logits_equal_the_model(ex, kv_heads, theta):
    from minignext.llama import Llama, LlamaConfig

    torch.manual_seed(kv_heads)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=theta)
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        ids = torch.randint(0, 64, (2, 9))
        check(ex.llama_logits(model, ids), model(ids),
              f"llama_logits vs minignext's Llama ({kv_heads} key/value heads, rope_theta={theta:g})",
              atol=1e-4, rtol=1e-4)
