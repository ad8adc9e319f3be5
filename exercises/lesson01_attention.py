"""Lesson 1 exercises: attention by hand.

Solve these before you read minignext/attention.py; then compare. Each function raises
NotImplementedError with a first hint; more hints, each closer to code, are in HINTS at the
bottom of this file. Look at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson01_attention.py --exercises=mine
"""

import math  # noqa: F401

import torch  # noqa: F401


def naive_attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(D) [+ causal mask]) v for q, k, v of shape (B, H, T, D), same H.

    With causal=True query i may look at keys 0..i only (Tq == Tk here)."""
    raise _stuck("naive_attention")


def online_softmax_step(m, l, acc, scores, v_block):
    """One FlashAttention step. Given the running max m (..., Tq, 1), the running normaliser
    l (..., Tq, 1) and the unnormalised output acc (..., Tq, D) of the blocks seen so far, fold in
    one more block of scores (..., Tq, Tb) with its values v_block (..., Tb, D).

    Return (m_new, l_new, acc_new). Start from m = -inf, l = 0, acc = 0; after the last block the
    attention output is acc / l. m may be -inf for a row that has seen only masked scores."""
    raise _stuck("online_softmax_step")


def tiled_attention(q, k, v, block_size, causal=False):
    """The whole FlashAttention forward (Dao et al. 2022, Algorithm 1) from your online_softmax_step:
    q (B, H, Tq, D), k and v (B, H, Tk, D). Visit the keys in blocks of `block_size` (the last one
    may be shorter), never building the (Tq, Tk) score matrix, and return (B, H, Tq, D).

    With causal=True, query i sees key j iff j <= i + (Tk - Tq): the diagonal is aligned to the end
    of the keys, as decoding with a KV cache needs (for Tq == Tk this is the usual j <= i)."""
    raise _stuck("tiled_attention")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "naive_attention": [
        "Every query scores every key with a scaled dot product; a softmax over the keys turns a "
        "row of scores into weights, and the output is the weighted average of the values. The "
        "causal mask removes, before the softmax, every key that lies after the query.",
        "Scores are (B, H, T, T): the matrix product of q with k transposed on its last two dims, "
        "divided by the square root of D. A masked score must become minus infinity, so that its "
        "weight after the softmax is exactly 0. The entries to mask are those strictly above the "
        "diagonal (key index > query index).",
        "scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]); for causal build "
        "future = torch.ones(T, T, dtype=torch.bool).triu(1) and scores.masked_fill(future, float('-inf')); "
        "then scores.softmax(-1) @ v.",
    ],
    "online_softmax_step": [
        "A softmax does not change when the same constant is subtracted from every score; subtract "
        "the largest score seen so far, so that no exponential overflows. When a new block brings a larger maximum, everything summed so far was "
        "computed against the old maximum and has to be rescaled to the new one.",
        "The new maximum is the larger of the old one and the block's row maximum. The block "
        "contributes exp(scores - new max) to the normaliser (summed over the block) and those "
        "weights times v_block to the output. The old normaliser and output are multiplied by "
        "exp(old max - new max). A row whose maximum is still -inf would compute -inf - (-inf) = "
        "nan: subtract 0 there instead.",
        "m_new = torch.maximum(m, scores.amax(-1, keepdim=True)); safe = m_new.masked_fill(m_new == "
        "float('-inf'), 0); p = torch.exp(scores - safe); c = torch.exp(m - safe); "
        "return m_new, l * c + p.sum(-1, keepdim=True), acc * c + p @ v_block",
    ],
    "tiled_attention": [
        "Start from an empty running state (max -inf, normaliser 0, output 0), fold in one block "
        "of keys at a time with your online_softmax_step, and divide the output by the normaliser "
        "at the end. Only the scores of one block exist at any time.",
        "For a block of keys start..stop the scores are (B, H, Tq, stop - start). For the causal "
        "case compare the key indices start..stop-1 with each query's last visible key, "
        "i + (Tk - Tq), and set the scores of invisible keys to -inf before the step.",
        "m = torch.full((B, H, Tq, 1), float('-inf')); l = torch.zeros_like(m); acc = "
        "torch.zeros(B, H, Tq, D); for start in range(0, Tk, block_size): s = q @ k[:, :, start:stop]"
        ".transpose(-1, -2) / math.sqrt(D); if causal: s = s.masked_fill(torch.arange(start, stop) > "
        "(torch.arange(Tq) + Tk - Tq)[:, None], float('-inf')); m, l, acc = online_softmax_step(m, l, "
        "acc, s, v[:, :, start:stop]); finally return acc / l.",
    ],
}
