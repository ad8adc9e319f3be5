"""Lesson 2 exercises: the three small pieces that make LLaMA differ from GPT-2.

Check your work:  python -m pytest tests/exercises/test_lesson02_llama.py --exercises=mine
"""

import torch


def rms_norm(x, weight, eps):
    """RMSNorm over the last dim of x (..., H), scaled by weight (H,).

    Compute in float32 and cast back to x.dtype before multiplying by weight, as LLaMA does."""
    raise NotImplementedError(
        "Divide x by the root mean square of its last dim: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) "
        "+ eps), computed on x.float(); cast the result back to x.dtype, then multiply by weight. "
        "Unlike LayerNorm there is no mean subtraction and no bias.")


def apply_rope(q, k, cos, sin):
    """Rotary position embedding, rotate-half layout. q (B, Hq, T, D), k (B, Hkv, T, D);
    cos, sin (T, D), where column i and column i + D/2 hold the same angle.

    Return (q_rotated, k_rotated): each pair (x_i, x_{i+D/2}) turned by its angle."""
    raise NotImplementedError(
        "Define rotate_half(x) = torch.cat([-x2, x1], dim=-1) where x1, x2 = x.chunk(2, dim=-1); then "
        "q_rot = q * cos + rotate_half(q) * sin, and the same for k. cos and sin broadcast over B and H.")


def kv_cache_update(cache_k, cache_v, k, v, start):
    """One step of a static KV cache. cache_k, cache_v (B, Hkv, Tmax, D) are preallocated;
    k, v (B, Hkv, T, D) are the keys and values of positions start .. start+T-1.

    Write them into the caches IN PLACE (no torch.cat, no new cache tensor) and return views
    (keys, values) of the filled part, positions 0 .. start+T-1."""
    raise NotImplementedError(
        "Slice-assign along the time dim: cache_k[:, :, start:start + T] = k (same for v), with "
        "T = k.shape[2]; then return cache_k[:, :, :start + T], cache_v[:, :, :start + T], which are "
        "views, so the caller attends over everything cached so far.")
