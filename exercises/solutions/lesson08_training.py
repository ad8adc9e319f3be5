"""Lesson 8 solutions, written out. The library's versions: `signal_distance` in
minignext/toy/train_nextgpt.py, `answer_ce` in minignext/toy/mllm.py, `freeze_old_rows` in
minignext/systems/nextgpt.py, `merge_lora` in minignext/weights.py, and `apply_delta` in
minignext/systems/nextgpt_checkpoint.py (which also takes the delta's resized embeddings and returns
the projections)."""

import torch
import torch.nn.functional as F


def signal_distance(pred, target):
    return (pred - target).norm(dim=-1).mean()       # one Euclidean distance per token, not squared


def answer_ce(logits, labels):
    # the output at t predicts the token at t + 1; -100 marks the prompt and padding
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def freeze_old_rows(param, first_new_id):
    def hook(grad):
        grad = grad.clone()          # the incoming gradient may be shared: never change it in place
        grad[:first_new_id] = 0
        return grad
    param.requires_grad_(True)
    return param.register_hook(hook)


def merge_lora(weight, lora_a, lora_b, alpha, r=None):
    r = r or lora_a.shape[0]
    if lora_a.shape != (r, weight.shape[1]) or lora_b.shape != (weight.shape[0], r):
        raise ValueError(f"LoRA A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit a weight "
                         f"{tuple(weight.shape)} at rank {r}")
    update = (lora_b.float() @ lora_a.float()) * (alpha / r)
    return (weight.float() + update).to(weight.dtype)


def apply_lora_delta(llm, delta, alpha):
    params = dict(llm.named_parameters())
    changed = []
    for key_a in [k for k in delta if ".lora_A." in k]:
        name = key_a.removeprefix("llama_model.").replace(".lora_A.weight", ".weight")
        if name not in params:
            raise KeyError(f"the delta adapts {name}, which this LLM does not have")
        lora_b = delta[key_a.replace(".lora_A.", ".lora_B.")]
        with torch.no_grad():
            params[name].copy_(merge_lora(params[name], delta[key_a], lora_b, alpha))
        changed.append(name)
    return sorted(changed)
