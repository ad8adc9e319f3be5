import pytest
import torch
from torch import nn

LESSON = "lesson08_training"


def test_signal_distance_is_the_mean_euclidean_distance(ex):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    per_token = [sum((pred[b, q, d] - target[b, q, d]) ** 2 for d in range(7)) ** 0.5
                 for b in range(3) for q in range(5)]
    torch.testing.assert_close(ex.signal_distance(pred, target), torch.stack(per_token).mean())
    assert not torch.allclose(ex.signal_distance(pred, target), ((pred - target) ** 2).sum(-1).mean())


def test_answer_ce_counts_only_labelled_next_tokens(ex):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = torch.tensor([4, 9])
    labels[1, 2] = 7
    logp = logits.log_softmax(-1)
    expected = -(logp[0, 2, 4] + logp[0, 3, 9] + logp[1, 1, 7]) / 3
    torch.testing.assert_close(ex.answer_ce(logits, labels), expected)


def test_freeze_old_rows_trains_only_the_new_rows(ex):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    before = emb.weight.detach().clone()
    ex.freeze_old_rows(emb.weight, 7)
    opt = torch.optim.Adam([emb.weight], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        emb(torch.arange(10)).pow(2).sum().backward()
        assert emb.weight.grad[:7].abs().sum() == 0
        torch.testing.assert_close(emb.weight.grad[7:], 2 * emb.weight.detach()[7:])
        opt.step()
    torch.testing.assert_close(emb.weight[:7], before[:7], rtol=0, atol=0)
    assert (emb.weight[7:] - before[7:]).abs().min() > 0


def test_merge_lora_equals_the_two_path_forward(ex):
    g = torch.Generator().manual_seed(2)
    w, a, b, x = (torch.randn(6, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g),
                  torch.randn(4, 5, generator=g))
    merged = ex.merge_lora(w, a, b, alpha=6.0)
    torch.testing.assert_close(x @ merged.T, x @ w.T + 2.0 * (x @ a.T) @ b.T)
    with pytest.raises(Exception):
        ex.merge_lora(w, a, b.T, alpha=6.0)
