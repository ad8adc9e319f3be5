"""Lesson 1 exercises: attention by hand.

Check your work:  python -m pytest tests/exercises/test_lesson01_attention.py --exercises=mine
"""

import torch


def naive_attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(D) [+ causal mask]) v for q, k, v of shape (B, H, T, D), same H.

    With causal=True query i may look at keys 0..i only (Tq == Tk here)."""
    raise NotImplementedError(
        "Compute scores = q @ k.transpose(-1, -2) / sqrt(D); for causal, fill the entries above the "
        "diagonal (torch.triu(..., diagonal=1)) with -inf; then softmax over the last dim and @ v.")


def online_softmax_step(m, l, acc, scores, v_block):
    """One FlashAttention step. Given the running max m (..., Tq, 1), the running normaliser
    l (..., Tq, 1) and the unnormalised output acc (..., Tq, D) of the blocks seen so far, fold in
    one more block of scores (..., Tq, Tb) with its values v_block (..., Tb, D).

    Return (m_new, l_new, acc_new). Start from m = -inf, l = 0, acc = 0; after the last block the
    attention output is acc / l. m may be -inf for a row that has seen only masked scores."""
    raise NotImplementedError(
        "m_new = max(m, scores.amax(-1, keepdim=True)); p = exp(scores - m_new); the old l and acc were "
        "computed against the old max, so multiply both by exp(m - m_new) before adding p.sum(-1) and "
        "p @ v_block. Guard rows where m_new is -inf (use 0 in place of it) to avoid inf - inf = nan.")
