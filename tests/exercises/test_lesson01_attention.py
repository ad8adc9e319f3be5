import pytest
import torch
import torch.nn.functional as F

from conftest import check, same

LESSON = "lesson01_attention"
FUTURE = "the mask lets a token see the future: changing the last key and value changed earlier outputs"
NO_RESCALE = ("the running normaliser and output were not rescaled when the maximum grew "
              "(multiply the old l and acc by exp(m_old - m_new))")


def qkv(b=2, h=3, tq=6, tk=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, h, tk, d, generator=g),
            torch.randn(b, h, tk, d, generator=g))


def assert_no_future(fn, q, k, v):
    """Outputs before the last query must not move when the last key and value change."""
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 3.0
    v2[:, :, -1] -= 3.0
    if not same(fn(q, k, v)[:, :, :-1], fn(q, k2, v2)[:, :, :-1]):
        pytest.fail(FUTURE, pytrace=False)


def test_naive_attention_matches_sdpa(ex):
    q, k, v = qkv()
    check(ex.naive_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
          "naive_attention vs torch's scaled_dot_product_attention", atol=1e-5, rtol=1e-5)


def test_naive_attention_causal(ex):
    q, k, v = qkv(seed=1)
    assert_no_future(lambda *x: ex.naive_attention(*x, causal=True), q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    check(ex.naive_attention(q, k, v, causal=True), want, "causal naive_attention vs SDPA with is_causal=True",
          atol=1e-5, rtol=1e-5)


def no_rescale(m, l, acc, scores, v):
    m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
    p = torch.exp(scores - m_new.masked_fill(torch.isinf(m_new), 0))
    return m_new, l + p.sum(-1, keepdim=True), acc + p @ v


def test_online_softmax_over_blocks_equals_softmax(ex):
    q, k, v = qkv(tq=5, tk=23, seed=2)
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5

    def fold(step):
        m = torch.full((*scores.shape[:-1], 1), float("-inf"))
        l, acc = torch.zeros_like(m), torch.zeros(*scores.shape[:-1], v.shape[-1])
        for start in range(0, 23, 7):                       # blocks of 7, 7, 7, 2
            m, l, acc = step(m, l, acc, scores[..., start:start + 7], v[..., start:start + 7, :])
        return m, l, acc

    m, l, acc = fold(ex.online_softmax_step)
    _, l_bad, acc_bad = fold(no_rescale)
    check(acc / l, scores.softmax(-1) @ v, "acc / l after the last block vs softmax(scores) @ v",
          wrong=[(NO_RESCALE, acc_bad / l_bad)], atol=1e-5, rtol=1e-5)
    check(m, scores.amax(-1, keepdim=True), "the running max after the last block")


def test_online_softmax_handles_a_fully_masked_first_block(ex):
    scores = torch.tensor([[float("-inf"), float("-inf"), 1.0, 3.0]])
    v = torch.arange(8.0).reshape(4, 2)
    m, l, acc = torch.full((1, 1), float("-inf")), torch.zeros(1, 1), torch.zeros(1, 2)
    m, l, acc = ex.online_softmax_step(m, l, acc, scores[:, :2], v[:2])
    m, l, acc = ex.online_softmax_step(m, l, acc, scores[:, 2:], v[2:])
    if not torch.isfinite(acc / l).all():
        pytest.fail("a row whose first block is fully masked became nan: exp(-inf - (-inf)); "
                    "subtract 0 where the running max is still -inf", pytrace=False)
    check(acc / l, scores.softmax(-1) @ v, "output after a fully masked first block")


@pytest.mark.parametrize("tq, tk, block", [(9, 9, 4), (3, 11, 5), (6, 6, 16)])
def test_tiled_attention_equals_sdpa(ex, tq, tk, block):
    q, k, v = qkv(tq=tq, tk=tk, seed=tq + tk)
    check(ex.tiled_attention(q, k, v, block), F.scaled_dot_product_attention(q, k, v),
          f"tiled_attention (blocks of {block}) vs SDPA", atol=1e-5, rtol=1e-5)
    causal_mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)     # diagonal aligned to the end
    assert_no_future(lambda *x: ex.tiled_attention(*x, block, causal=True), q, k, v)
    check(ex.tiled_attention(q, k, v, block, causal=True),
          F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask),
          f"causal tiled_attention (Tq={tq}, Tk={tk}) vs SDPA with the end-aligned causal mask",
          atol=1e-5, rtol=1e-5)


def test_tiled_attention_never_builds_the_score_matrix(ex):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    q, k, v = qkv(b=1, h=1, tq=64, tk=64, d=4)
    with Largest() as watch:
        ex.tiled_attention(q, k, v, 8, causal=True)
    assert watch.numel < 64 * 64, (f"tiled_attention built a tensor of {watch.numel} elements; the full score "
                                   f"matrix has {64 * 64}: compute the scores of one block of keys at a time")
