import pytest
import torch
from torch import nn

from conftest import check

LESSON = "lesson08_training"
SQUARED = "that is the squared distance (an MSE summed over D), not the Euclidean distance: take the norm"
UNSHIFTED = ("off by one position: the logits at position t predict the label at t + 1 "
             "(drop the last logits and the first labels)")
IN_PLACE = ("the gradient was changed in place: a hook must return a changed copy and leave the tensor it "
            "was given alone (other hooks, or other uses of the same gradient, still read it)")


def test_signal_distance_is_the_mean_euclidean_distance(ex):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    per_token = [sum((pred[b, q, d] - target[b, q, d]) ** 2 for d in range(7)) ** 0.5
                 for b in range(3) for q in range(5)]
    check(ex.signal_distance(pred, target), torch.stack(per_token).mean(), "signal_distance vs a loop over tokens",
          wrong=[(SQUARED, ((pred - target) ** 2).sum(-1).mean()), (SQUARED, ((pred - target) ** 2).mean())])


def test_answer_ce_counts_only_labelled_next_tokens(ex):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = torch.tensor([4, 9])
    labels[1, 2] = 7
    logp = logits.log_softmax(-1)
    expected = -(logp[0, 2, 4] + logp[0, 3, 9] + logp[1, 1, 7]) / 3
    unshifted = -(logp[0, 3, 4] + logp[0, 4, 9] + logp[1, 2, 7]) / 3
    check(ex.answer_ce(logits, labels), expected, "answer_ce vs a hand-written log-softmax over the 3 labels",
          wrong=[(UNSHIFTED, unshifted)])


def test_freeze_old_rows_trains_only_the_new_rows(ex):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    before = emb.weight.detach().clone()
    given = {}

    def earlier_hook(grad):            # runs first and hands its own tensor on to the exercise's hook
        given["tensor"], given["copy"] = grad.clone(), grad.clone()
        return given["tensor"]

    emb.weight.register_hook(earlier_hook)
    ex.freeze_old_rows(emb.weight, 7)
    opt = torch.optim.Adam([emb.weight], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        emb(torch.arange(10)).pow(2).sum().backward()
        if not torch.equal(given["tensor"], given["copy"]):
            pytest.fail(IN_PLACE, pytrace=False)
        assert emb.weight.grad[:7].abs().sum() == 0, "the old rows (0..6) still get a gradient"
        check(emb.weight.grad[7:], 2 * emb.weight.detach()[7:], "the gradient of the new rows (left as it was)")
        opt.step()
    check(emb.weight[:7], before[:7], "the old rows after 3 Adam steps (they must not move at all)", rtol=0, atol=0)
    assert (emb.weight[7:] - before[7:]).abs().min() > 0, "the new rows did not train"


def test_merge_lora_equals_the_two_path_forward(ex):
    g = torch.Generator().manual_seed(2)
    w, a, b, x = (torch.randn(6, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g),
                  torch.randn(4, 5, generator=g))
    merged = ex.merge_lora(w, a, b, alpha=6.0)
    check(x @ merged.T, x @ w.T + 2.0 * (x @ a.T) @ b.T, "x through the merged weight vs base + (alpha/r) B A path",
          wrong=[("the update was not scaled by alpha / r", x @ w.T + (x @ a.T) @ b.T)])
    with pytest.raises(Exception):
        ex.merge_lora(w, a, b.T, alpha=6.0)


def test_apply_lora_delta_equals_the_checkpoint_loader(ex):
    import copy

    from minignext.llama import Llama, LlamaConfig
    from minignext.systems.nextgpt_checkpoint import apply_delta

    torch.manual_seed(3)
    llm = Llama(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=4)).eval()
    delta, r = {}, 4
    for i in range(2):
        for proj, (out, inp) in {"q_proj": (16, 16), "v_proj": (16, 16)}.items():
            path = f"llama_model.model.layers.{i}.self_attn.{proj}"
            delta[f"{path}.lora_A.weight"] = torch.randn(r, inp) * 0.3
            delta[f"{path}.lora_B.weight"] = torch.randn(out, r) * 0.3
    want = copy.deepcopy(llm)
    apply_delta(want, delta, lora_alpha=8.0)
    before = {k: id(p) for k, p in llm.named_parameters()}
    changed = ex.apply_lora_delta(llm, delta, 8.0)
    assert changed == sorted(f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")), \
        f"the changed weights should be the 4 adapted projections, got {changed}"
    assert {k: id(p) for k, p in llm.named_parameters()} == before, "write into the existing parameters (copy_)"
    for name, p in want.named_parameters():
        check(dict(llm.named_parameters())[name].detach(), p.detach(), f"{name} after merging", atol=1e-6, rtol=1e-6)
    with pytest.raises(KeyError):
        ex.apply_lora_delta(llm, {"llama_model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(1, 16),
                                  "llama_model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(24, 1)}, 8.0)
