"""Lesson 2 exercises: the pieces that make LLaMA differ from GPT-2, then a whole LLaMA forward.

Solve these before you read minignext/llama.py; then compare. Each function raises
NotImplementedError with a first hint; more hints, each closer to code, are in HINTS at the
bottom of this file. Look at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson02_llama.py --exercises=mine
"""

import math  # noqa: F401

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401


def rms_norm(x, weight, eps):
    """RMSNorm over the last dim of x (..., H), scaled by weight (H,).

    Compute in float32 and cast back to x.dtype before multiplying by weight, as LLaMA does."""
    raise _stuck("rms_norm")


def apply_rope(q, k, cos, sin):
    """Rotary position embedding, rotate-half layout. q (B, Hq, T, D), k (B, Hkv, T, D);
    cos, sin (T, D), where column i and column i + D/2 hold the same angle.

    Return (q_rotated, k_rotated): each pair (x_i, x_{i+D/2}) turned by its angle."""
    raise _stuck("apply_rope")


def kv_cache_update(cache_k, cache_v, k, v, start):
    """One step of a static KV cache. cache_k, cache_v (B, Hkv, Tmax, D) are preallocated;
    k, v (B, Hkv, T, D) are the keys and values of positions start .. start+T-1.

    Write them into the caches IN PLACE (no torch.cat, no new cache tensor) and return views
    (keys, values) of the filled part, positions 0 .. start+T-1."""
    raise _stuck("kv_cache_update")


def llama_logits(model, ids):
    """The whole LLaMA forward, assembled from your rms_norm and apply_rope: ids (B, T) -> logits
    (B, T, vocab) for a minignext `Llama` (the same names as Hugging Face's LlamaForCausalLM).

    You may call the model's nn.Embedding and nn.Linear modules (model.model.embed_tokens,
    layer.self_attn.q_proj, layer.mlp.gate_proj, model.lm_head, ...) and read model.config
    (rms_norm_eps, rope_theta, num_attention_heads, num_key_value_heads, head_dim); the norms, the
    rotary embedding, causal attention with grouped-query heads, the SwiGLU MLP and the residual
    connections are yours. Every layer: x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""
    raise _stuck("llama_logits")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "rms_norm": [
        "LayerNorm without the mean: divide each vector by its root mean square (plus a small eps "
        "inside the root), then scale every feature by its learned weight. No mean is subtracted "
        "and there is no bias.",
        "Square the features, average them over the last dim (keep that dim so it broadcasts), add "
        "eps, take one over the square root and multiply. Do this on a float32 copy; cast the "
        "result back to the input's dtype, and only then multiply by the weight.",
        "x32 = x.float(); x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps); "
        "return weight * x32.to(x.dtype)",
    ],
    "apply_rope": [
        "Split every head vector into two halves. Coordinate i of the first half and coordinate i "
        "of the second half form a 2-D point, and that point is rotated by the angle of its "
        "position and pair. q and k are rotated the same way; v is not rotated.",
        "A rotation by a maps (a1, a2) to (a1 cos - a2 sin, a2 cos + a1 sin). Written for whole "
        "vectors: x * cos + r(x) * sin, where r(x) puts minus the second half in front of the "
        "first half. cos and sin already hold each angle twice, once per half, and broadcast "
        "over batch and heads.",
        "def rotate_half(x): x1, x2 = x.chunk(2, dim=-1); return torch.cat([-x2, x1], dim=-1); "
        "return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin",
    ],
    "kv_cache_update": [
        "The cache is a long tensor with room for every position. Each step writes its new keys "
        "and values into the next free positions, in place, and the caller attends over "
        "everything written so far.",
        "The new positions are start up to start + T along the time dim (dim 2). Assigning to a "
        "slice writes in place; slicing the first start + T positions gives a view, not a copy.",
        "stop = start + k.shape[2]; cache_k[:, :, start:stop] = k; cache_v[:, :, start:stop] = v; "
        "return cache_k[:, :, :stop], cache_v[:, :, :stop]",
    ],
    "llama_logits": [
        "Embed the ids, run every decoder layer (pre-norm attention with a residual, then pre-norm "
        "MLP with a residual), apply the final norm and the language-model head. Each layer's "
        "attention projects q, k and v, rotates q and k by their positions, and attends causally.",
        "Rotary tables: for pair i the frequency is rope_theta to the power -2i/D; the angle of "
        "position p is p times it; repeat the T x D/2 angles twice along the last dim and take cos "
        "and sin. Heads: view q as (B, T, Hq, D) and transpose to (B, Hq, T, D); k and v have Hkv "
        "heads, so repeat each of them Hq / Hkv times along the head dim before attending. The "
        "MLP is down(silu(gate(x)) * up(x)).",
        "angles = torch.arange(T)[:, None] * c.rope_theta ** (-torch.arange(0, D, 2) / D); "
        "cos, sin = torch.cat([angles, angles], -1).cos(), ...sin(); per layer: h = rms_norm(x, "
        "layer.input_layernorm.weight, eps); q = layer.self_attn.q_proj(h).view(B, T, Hq, D)."
        "transpose(1, 2) (k, v likewise with Hkv); q, k = apply_rope(q, k, cos, sin); k = "
        "k.repeat_interleave(Hq // Hkv, 1) (and v); y = F.scaled_dot_product_attention(q, k, v, "
        "is_causal=True); x = x + layer.self_attn.o_proj(y.transpose(1, 2).reshape(B, T, Hq * D)); "
        "then the MLP; at the end model.lm_head(rms_norm(x, model.model.norm.weight, eps)).",
    ],
}
