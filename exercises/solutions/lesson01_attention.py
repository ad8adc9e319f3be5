"""Lesson 1 solutions, written out. minignext/attention.py has the same algorithms with the
extras a library needs: grouped-query heads, padding and additive masks (`_naive`, `_tiled`,
`online_softmax_step`)."""

import math

import torch


def naive_attention(q, k, v, causal=False):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        # key j lies in the future of query i when j > i: strictly above the diagonal
        t = scores.shape[-1]
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def online_softmax_step(m, l, acc, scores, v_block):
    m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
    # a row that has seen only masked scores keeps m = -inf; subtracting 0 there avoids inf - inf
    safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
    p = torch.exp(scores - safe)
    correction = torch.exp(m - safe)           # what was summed against the old max, rescaled
    return m_new, l * correction + p.sum(dim=-1, keepdim=True), acc * correction + p @ v_block


def tiled_attention(q, k, v, block_size, causal=False):
    b, h, tq, d = q.shape
    tk = k.shape[2]
    m = torch.full((b, h, tq, 1), float("-inf"), device=q.device)
    l = torch.zeros(b, h, tq, 1, device=q.device)
    acc = torch.zeros(b, h, tq, d, device=q.device)
    last_visible = torch.arange(tq, device=q.device) + (tk - tq)        # per query
    for start in range(0, tk, block_size):
        stop = min(start + block_size, tk)
        s = q @ k[:, :, start:stop].transpose(-1, -2) / math.sqrt(d)    # one block of scores only
        if causal:
            hidden = torch.arange(start, stop, device=q.device)[None, :] > last_visible[:, None]
            s = s.masked_fill(hidden, float("-inf"))
        m, l, acc = online_softmax_step(m, l, acc, s, v[:, :, start:stop])
    return acc / l
