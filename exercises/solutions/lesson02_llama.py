"""Lesson 2 solutions, written out. minignext/llama.py computes the same (`rms_norm`,
`rope_tables`, `apply_rope`, `kv_cache_update`, and the Llama* modules), with a KV cache and
minignext.attention for the attention itself."""

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    # in float32, so that squaring fp16/bf16 activations cannot overflow or lose precision
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q, k, cos, sin):
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): a 2-D rotation of each (x_i, x_{i+D/2}) pair
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def kv_cache_update(cache_k, cache_v, k, v, start):
    stop = start + k.shape[2]
    cache_k[:, :, start:stop] = k           # slice assignment writes into the preallocated storage
    cache_v[:, :, start:stop] = v
    return cache_k[:, :, :stop], cache_v[:, :, :stop]     # views: no copy


def llama_logits(model, ids):
    c = model.config
    b, t = ids.shape
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    angles = torch.arange(t).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)             # the same angle for i and i + D/2
    cos, sin = angles.cos(), angles.sin()
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        h = rms_norm(x, layer.input_layernorm.weight, c.rms_norm_eps)
        q = attn.q_proj(h).view(b, t, hq, d).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, hkv, d).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, hkv, d).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)   # GQA
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(b, t, hq * d))
        h = rms_norm(x, layer.post_attention_layernorm.weight, c.rms_norm_eps)
        x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))          # SwiGLU
    return model.lm_head(rms_norm(x, model.model.norm.weight, c.rms_norm_eps))
