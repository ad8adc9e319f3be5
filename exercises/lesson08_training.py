"""Lesson 8 exercises: NExT-GPT's training stages, then applying a trained delta.

Solve these before you read minignext/toy/train_nextgpt.py, minignext/toy/mllm.py,
minignext/lora.py and minignext/systems/nextgpt_checkpoint.py; then compare. Each function raises NotImplementedError
with a first hint; more hints, each closer to code, are in HINTS at the bottom of this file. Look
at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson08_training.py --exercises=mine
"""

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401


def signal_distance(pred, target):
    """Stage 2's decoder-side loss. pred, target: (B, Q, D) projected signal states and the decoder
    text encoder's output. Return the mean over all B*Q tokens of the Euclidean distance."""
    raise _stuck("signal_distance")


def answer_ce(logits, labels):
    """logits (B, T, V); labels (B, T) holding the token id where the model must learn it (assistant
    tokens) and -100 elsewhere. Return the mean next-token cross-entropy over the labelled tokens:
    the logits at position t predict the label at position t + 1."""
    raise _stuck("answer_ce")


def freeze_old_rows(param, first_new_id):
    """Let only rows >= first_new_id of an embedding / lm_head matrix train: make `param` require
    gradients and register a gradient hook on it that zeroes the gradient of the older rows.
    Return the hook handle."""
    raise _stuck("freeze_old_rows")


def merge_lora(weight, lora_a, lora_b, alpha, r=None):
    """LoRA (Hu et al. 2021, eq. 3): return W + (alpha / r) * B @ A, with A (r, in) and B (out, r);
    r defaults to A's number of rows. Raise an error if the shapes do not fit."""
    raise _stuck("merge_lora")


def apply_lora_delta(llm, delta, alpha):
    """Merge a trained LoRA delta into an LLM, in place, with your merge_lora.

    delta: {name: tensor} in the released checkpoint's names after conversion: for every adapted
    nn.Linear of `llm` whose weight is called "<path>.weight" (e.g. "model.layers.0.self_attn.q_proj
    .weight"), the pair "llama_model.<path>.lora_A.weight" (r, in) and "llama_model.<path>.lora_B.weight"
    (out, r). Change those weights of `llm` in place (no new parameters) and return the sorted list
    of the weight names that changed. Raise KeyError if a pair has no weight in `llm`."""
    raise _stuck("apply_lora_delta")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "signal_distance": [
        "One distance per token: the length of the difference vector between the prediction and "
        "the target. Average those lengths over every token of every sample. A length, not a "
        "squared length.",
        "The difference is (B, Q, D); its norm over the last dim is (B, Q); the mean of that is a "
        "scalar.",
        "return (pred - target).norm(dim=-1).mean()",
    ],
    "answer_ce": [
        "A causal LM's output at position t is its guess for the token at t + 1. Pair every output "
        "with the label one position later, and average the cross-entropy over the pairs whose "
        "label is not the 'ignore' value -100.",
        "Drop the last position of the logits and the first position of the labels, flatten both "
        "over batch and time, and let cross-entropy skip the -100 labels (it has an argument for it).",
        "return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)",
    ],
    "freeze_old_rows": [
        "A tensor hook sees the gradient before it reaches the parameter and may return a "
        "replacement. Return a copy with the old rows zeroed; never change the gradient it was "
        "given, which other hooks or other uses of the same tensor may still read.",
        "Make the parameter require gradients, then register a function on it with "
        "register_hook. The function clones its argument, writes zeros into the rows before "
        "first_new_id of the clone, and returns the clone. Return what register_hook returns.",
        "def hook(grad): grad = grad.clone(); grad[:first_new_id] = 0; return grad; "
        "param.requires_grad_(True); return param.register_hook(hook)",
    ],
    "merge_lora": [
        "The low-rank update is the product of the two small matrices, scaled by alpha over the "
        "rank; adding it to the weight gives the same outputs as running the base layer and the "
        "adapter side by side. Check the shapes before multiplying.",
        "B @ A is (out, in), the weight's shape. Compute in float32 and cast the sum back to the "
        "weight's dtype (checkpoints are often fp16). Raise ValueError when A is not (r, in) or B "
        "is not (out, r).",
        "r = r or lora_a.shape[0]; (check shapes, raise ValueError); return (weight.float() + "
        "(lora_b.float() @ lora_a.float()) * (alpha / r)).to(weight.dtype)",
    ],
    "apply_lora_delta": [
        "Every lora_A key names one adapted layer; its lora_B partner and the layer's weight follow "
        "from the name. Merge each pair into that weight and write the result back into the same "
        "parameter.",
        "Strip the 'llama_model.' prefix and turn '.lora_A.weight' into '.weight' to get the "
        "parameter's name; dict(llm.named_parameters()) finds it. Write with copy_ inside "
        "torch.no_grad(), so the parameter stays the same object.",
        "params = dict(llm.named_parameters()); for key in delta: if '.lora_A.' in key: name = "
        "key.removeprefix('llama_model.').replace('.lora_A.weight', '.weight'); b = delta[key.replace("
        "'.lora_A.', '.lora_B.')]; with torch.no_grad(): params[name].copy_(merge_lora(params[name], "
        "delta[key], b, alpha))",
    ],
}
