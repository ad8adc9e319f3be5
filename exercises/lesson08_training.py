"""Lesson 8 exercises: NExT-GPT's training stages (minignext/toy/train_nextgpt.py, minignext/lora.py).

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson08_training.py --exercises=mine
"""


def signal_distance(pred, target):
    """Stage 2's decoder-side loss. pred, target: (B, Q, D) projected signal states and the decoder
    text encoder's output. Return the mean over all B*Q tokens of the Euclidean distance."""
    raise NotImplementedError(
        "Subtract, take the L2 norm over the last dimension (one distance per token, NOT squared: "
        "that would be an MSE), then average over batch and tokens: (pred - target).norm(dim=-1).mean().")


def answer_ce(logits, labels):
    """logits (B, T, V); labels (B, T) holding the token id where the model must learn it (assistant
    tokens) and -100 elsewhere. Return the mean next-token cross-entropy over the labelled tokens."""
    raise NotImplementedError(
        "Shift by one: logits[:, :-1] predict labels[:, 1:]. Flatten both and call "
        "F.cross_entropy(..., ignore_index=-100) so that prompt and padding positions do not count.")


def freeze_old_rows(param, first_new_id):
    """Let only rows >= first_new_id of an embedding / lm_head matrix train: register a gradient hook
    on `param` that zeroes the gradient of the older rows. Return the hook handle."""
    raise NotImplementedError(
        "Set param.requires_grad_(True), then param.register_hook(fn) where fn clones the gradient, "
        "writes zeros into grad[:first_new_id] and returns the clone (never modify the incoming "
        "gradient in place). NExT-GPT itself forgot this and trained all 32038 rows.")


def merge_lora(weight, lora_a, lora_b, alpha, r=None):
    """LoRA (Hu et al. 2021, eq. 3): return W + (alpha / r) * B @ A, with A (r, in) and B (out, r);
    r defaults to A's number of rows. Raise an error if the shapes do not fit."""
    raise NotImplementedError(
        "r = r or lora_a.shape[0]; check lora_a is (r, in) and lora_b is (out, r) for weight (out, in); "
        "compute (lora_b.float() @ lora_a.float()) * (alpha / r), add it to weight.float(), and cast "
        "back to weight.dtype.")
