"""Lesson 9 exercises: the design space of connectors, LLaVA's side of it.

Solve these before you read minignext/systems/llava.py (select_features, splice_image_features) and
minignext/toy/mllm.py (tokens_with_labels); then compare. Each function raises NotImplementedError
with a first hint; more hints, each closer to code, are in HINTS at the bottom of this file. Look
at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson09_family.py --exercises=mine
"""

import torch  # noqa: F401


def select_features(hidden_states, layers, strategy="default"):
    """LLaVA's vision features. hidden_states: the vision tower's states, a tuple of (N, 1 + P, D)
    tensors that begins with the input of the first layer (CLS first in every one). Return the
    states at the indices `layers` (LLaVA-1.5: (-2,)), with CLS dropped when strategy is "default"
    and kept when it is "full", concatenated along the width: (N, P, D * len(layers))."""
    raise _stuck("select_features")


def splice_image_features(embeds, slots, features):
    """embeds (B, T, H): the LLM's input embeddings; slots (B, T) bool: True at every <image>
    placeholder; features (N, P, H): P projected patch features for each of N images. Return a new
    tensor with the features written into the placeholders, in reading order (row by row, left to
    right): the first image's P features fill the first P placeholders, and so on. Keep the graph:
    gradients must reach `features`."""
    raise _stuck("splice_image_features")


def tokens_with_labels(tokenizer, text, spans):
    """Tokenize `text` ONCE (tokenizer.tok.encode(text, add_special_tokens=False), a `tokenizers`
    Encoding with .ids and .offsets, the character range [start, end) of each token) and return
    (ids, labels): a token's label is its id where the token overlaps one of the character spans
    [a, b) of the answers, and -100 elsewhere."""
    raise _stuck("tokens_with_labels")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "select_features": [
        "Pick the listed layers' states out of the tuple, keep or drop the first token (the CLS "
        "summary) of each according to the strategy, and lay the pieces side by side along the "
        "feature width. Index -2 is the OUTPUT of the second-to-last layer: LLaVA skips the last "
        "one, which CLIP's training shaped for its contrastive CLS, not for the patches.",
        "One piece per index in layers: hidden_states[i], sliced from token 1 on when the strategy "
        "is 'default'. Concatenate the pieces on the last dimension.",
        "return torch.cat([hidden_states[i][:, 1:] if strategy == 'default' else hidden_states[i] "
        "for i in layers], dim=-1)",
    ],
    "splice_image_features": [
        "Line every patch feature of every image up in one long list, in order, and write them "
        "one after the other into the positions the mask marks, reading the batch row by row. "
        "Build a new tensor instead of writing into the one you were given, so that autograd can "
        "carry the gradient back to the features.",
        "Flatten the features to (N * P, H). Tensor.masked_scatter fills the True positions of a "
        "mask with consecutive values of a source, in row-major order; the mask needs a trailing "
        "dimension of size 1 to broadcast over H.",
        "return embeds.masked_scatter(slots[..., None], features.reshape(-1, embeds.shape[-1]))",
    ],
    "tokens_with_labels": [
        "Tokenize the whole conversation once and use the character range that the tokenizer "
        "reports for each token: a token is an answer token when its range overlaps an answer's "
        "range. Tokenizing each turn apart to count lengths disagrees with the whole text's "
        "tokenization at the joins, which silently shifts every label after the first turn.",
        "The Encoding has .ids and .offsets, one (start, end) per token. A token (s, e) overlaps a "
        "span (a, b) when s < b and e > a. Labels are the id there and -100 elsewhere.",
        "enc = tokenizer.tok.encode(text, add_special_tokens=False)\n"
        "labels = [i if any(s < b and e > a for a, b in spans) else -100 "
        "for i, (s, e) in zip(enc.ids, enc.offsets)]\nreturn enc.ids, labels",
    ],
}
