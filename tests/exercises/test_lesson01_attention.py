import torch
import torch.nn.functional as F

LESSON = "lesson01_attention"


def qkv(b=2, h=3, tq=6, tk=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, h, tk, d, generator=g),
            torch.randn(b, h, tk, d, generator=g))


def test_naive_attention_matches_sdpa(ex):
    q, k, v = qkv()
    torch.testing.assert_close(ex.naive_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_naive_attention_causal(ex):
    q, k, v = qkv(seed=1)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ex.naive_attention(q, k, v, causal=True), want, atol=1e-5, rtol=1e-5)


def test_online_softmax_over_blocks_equals_softmax(ex):
    q, k, v = qkv(tq=5, tk=23, seed=2)
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5
    m = torch.full((*scores.shape[:-1], 1), float("-inf"))
    l = torch.zeros_like(m)
    acc = torch.zeros(*scores.shape[:-1], v.shape[-1])
    for start in range(0, 23, 7):                       # blocks of 7, 7, 7, 2
        m, l, acc = ex.online_softmax_step(m, l, acc, scores[..., start:start + 7], v[..., start:start + 7, :])
    torch.testing.assert_close(acc / l, scores.softmax(-1) @ v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, scores.amax(-1, keepdim=True))


def test_online_softmax_handles_a_fully_masked_first_block(ex):
    scores = torch.tensor([[float("-inf"), float("-inf"), 1.0, 3.0]])
    v = torch.arange(8.0).reshape(4, 2)
    m, l, acc = torch.full((1, 1), float("-inf")), torch.zeros(1, 1), torch.zeros(1, 2)
    m, l, acc = ex.online_softmax_step(m, l, acc, scores[:, :2], v[:2])
    m, l, acc = ex.online_softmax_step(m, l, acc, scores[:, 2:], v[2:])
    want = scores.softmax(-1) @ v
    assert torch.isfinite(acc / l).all()
    torch.testing.assert_close(acc / l, want)
