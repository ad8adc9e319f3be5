"""Scaled dot-product attention, three ways, one signature.

    naive  - materialises the (Tq, Tk) score matrix; the textbook formula.
    tiled  - FlashAttention's online softmax (Dao et al. 2022, Algorithm 1) in
             plain PyTorch: keys are visited block by block and no (Tq, Tk)
             tensor is ever built.
    fused  - torch.nn.functional.scaled_dot_product_attention (the default).

Shapes: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) with Hq a multiple of Hkv
(grouped-query attention). K and V are never repeated to Hq heads here: the
naive and tiled paths fold the query heads into groups, and the fused path
asks SDPA to broadcast. So a KV cache stores Hkv heads only.

Masks (all optional, combined):
    causal            query i sees key j iff j <= i + (Tk - Tq); the causal
                      diagonal is aligned to the *end* of the keys, which is
                      what decoding with a KV cache needs.
    key_padding_mask  (B, Tk) bool, True where the key is a real token.
    attn_mask         bool (True = may attend) or additive float, broadcastable
                      to (B, Hq, Tq, Tk).
A query row that can see no key at all has no defined output.
"""

import math

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("naive", "tiled", "fused")
_default_impl = "fused"


def set_default_impl(impl: str) -> None:
    """Switch every attention call that does not name an implementation."""
    global _default_impl
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    _default_impl = impl


def get_default_impl() -> str:
    return _default_impl


def attention(q, k, v, *, causal=False, key_padding_mask=None, attn_mask=None,
              scale=None, impl=None, block_size=64):
    impl = impl or _default_impl
    _check_shapes(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if impl == "fused":
        return _fused(q, k, v, causal, key_padding_mask, attn_mask, scale)
    if impl == "naive":
        return _naive(q, k, v, causal, key_padding_mask, attn_mask, scale)
    if impl == "tiled":
        return _tiled(q, k, v, causal, key_padding_mask, attn_mask, scale, block_size)
    raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


def _check_shapes(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention wants (B, H, T, D) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot be grouped over {k.shape[1]} key/value heads")


def causal_mask(tq, tk, device=None):
    """(Tq, Tk) bool, True where query i may see key j (end-aligned diagonal)."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    return torch.arange(tk, device=device)[None, :] <= i


def combined_mask(q, k, causal, key_padding_mask, attn_mask):
    """Fold all masks into one additive float mask broadcastable to (B, H, Tq, Tk), or None."""
    tq, tk = q.shape[-2], k.shape[-2]
    mask = None

    def add(m):
        nonlocal mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, float("-inf"))
        mask = m.to(q.dtype) if mask is None else mask + m.to(q.dtype)

    if causal:
        add(causal_mask(tq, tk, q.device))
    if key_padding_mask is not None:
        add(key_padding_mask[:, None, None, :].bool())
    if attn_mask is not None:
        add(attn_mask)
    return mask


def _naive(q, k, v, causal, key_padding_mask, attn_mask, scale):
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, tq, d)                                  # group query heads
    scores = (qg @ k.unsqueeze(2).transpose(-1, -2)) * scale          # (B, Hkv, G, Tq, Tk)
    mask = combined_mask(q, k, causal, key_padding_mask, attn_mask)
    if mask is not None:
        mask = mask.expand(b, hq, tq, k.shape[-2]).reshape(b, hkv, g, tq, k.shape[-2])
        scores = scores + mask
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return (probs @ v.unsqueeze(2)).reshape(b, hq, tq, d)


def _tiled(q, k, v, causal, key_padding_mask, attn_mask, scale, block_size):
    """Online softmax over key blocks: keep a running max m, a running normaliser l
    and an unnormalised output acc; rescale them whenever the max grows."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, tq, d).float() * scale
    m = torch.full((b, hkv, g, tq, 1), float("-inf"), device=q.device)
    l = torch.zeros((b, hkv, g, tq, 1), device=q.device)
    acc = torch.zeros((b, hkv, g, tq, d), device=q.device)
    q_pos = torch.arange(tq, device=q.device) + (tk - tq)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(b, hq, tq, tk)
    for start in range(0, tk, block_size):
        stop = min(start + block_size, tk)
        kb = k[:, :, start:stop].unsqueeze(2).float()                   # (B, Hkv, 1, Tb, D)
        vb = v[:, :, start:stop].unsqueeze(2).float()
        s = qg @ kb.transpose(-1, -2)                                   # (B, Hkv, G, Tq, Tb)
        if causal:
            visible = torch.arange(start, stop, device=q.device)[None, :] <= q_pos[:, None]
            s = s.masked_fill(~visible, float("-inf"))
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, None, start:stop].bool(), float("-inf"))
        if attn_mask is not None:
            mb = attn_mask[..., start:stop].reshape(b, hkv, g, tq, stop - start)
            s = s.masked_fill(~mb, float("-inf")) if mb.dtype == torch.bool else s + mb.float()
        m, l, acc = online_softmax_step(m, l, acc, s, vb)
    return (acc / l).to(q.dtype).reshape(b, hq, tq, d)


def online_softmax_step(m, l, acc, scores, v_block):
    """Fold one block of scores (..., Tq, Tb) and values (..., Tb, D) into the running
    max m (..., Tq, 1), normaliser l (..., Tq, 1) and unnormalised output acc (..., Tq, D).

    After the last block, softmax(all scores) @ V == acc / l.
    """
    m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
    m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)                # rows that saw nothing yet
    p = torch.exp(scores - m_safe)
    correction = torch.exp(m - m_safe)                                 # rescale what came before
    return m_new, l * correction + p.sum(dim=-1, keepdim=True), acc * correction + p @ v_block


def _fused(q, k, v, causal, key_padding_mask, attn_mask, scale):
    tq, tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is None and attn_mask is None and (not causal or tq == tk or tq == 1):
        # The fast kernels: no explicit mask. With one query, end-aligned causal is no mask.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and tq > 1,
                                              scale=scale, enable_gqa=gqa)
    mask = _bool_or_float_mask(q, k, causal, key_padding_mask, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _bool_or_float_mask(q, k, causal, key_padding_mask, attn_mask):
    """SDPA takes a single mask; keep it boolean when every part is boolean."""
    parts = []
    if causal:
        parts.append(causal_mask(q.shape[-2], k.shape[-2], q.device))
    if key_padding_mask is not None:
        parts.append(key_padding_mask[:, None, None, :].bool())
    if attn_mask is not None:
        parts.append(attn_mask)
    if all(p.dtype == torch.bool for p in parts):
        mask = parts[0]
        for p in parts[1:]:
            mask = mask & p
        return mask
    return combined_mask(q, k, causal, key_padding_mask, attn_mask)


class MultiheadAttention(torch.nn.Module):
    """torch.nn.MultiheadAttention's parameters and initialisation (packed in_proj, out_proj, and
    with add_bias_kv one extra learned key and value appended to every sequence), computed through
    `attention`. Used where a checkpoint stores nn.MultiheadAttention's keys (ImageBind, NExT-GPT's
    output projection)."""

    def __init__(self, dim, heads, add_bias_kv=False):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = torch.nn.Parameter(torch.empty(3 * dim))
        if add_bias_kv:
            self.bias_k = torch.nn.Parameter(torch.empty(1, 1, dim))
            self.bias_v = torch.nn.Parameter(torch.empty(1, 1, dim))
        self.out_proj = torch.nn.Linear(dim, dim)
        if self.in_proj_weight.device.type != "meta":
            torch.nn.init.xavier_uniform_(self.in_proj_weight)
            torch.nn.init.zeros_(self.in_proj_bias)
            torch.nn.init.zeros_(self.out_proj.bias)
            if add_bias_kv:
                torch.nn.init.xavier_normal_(self.bias_k)
                torch.nn.init.xavier_normal_(self.bias_v)

    def forward(self, x, memory=None, causal=False):
        """x (B, Tq, D) attends to `memory` (B, Tk, D), or to itself when memory is None."""
        w_q, w_kv = self.in_proj_weight.split([x.shape[-1], 2 * x.shape[-1]])
        b_q, b_kv = self.in_proj_bias.split([x.shape[-1], 2 * x.shape[-1]])
        q = F.linear(x, w_q, b_q)
        k, v = F.linear(x if memory is None else memory, w_kv, b_kv).chunk(2, dim=-1)
        if hasattr(self, "bias_k"):
            k = torch.cat([k, self.bias_k.expand(k.shape[0], 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(v.shape[0], 1, -1)], dim=1)
        b, tq, d = q.shape
        heads = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = attention(heads(q), heads(k), heads(v), causal=causal)       # (B, H, Tq, D/H)
        return self.out_proj(out.transpose(1, 2).reshape(b, tq, d))
