"""Lesson 9 exercises: the design space of connectors (minignext/systems/llava.py, minignext/toy/mllm.py).

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson09_family.py --exercises=mine
"""


def select_features(hidden_states, layers, strategy="default"):
    """LLaVA's vision features. hidden_states: the vision tower's states, a tuple of (N, 1 + P, D)
    tensors that begins with the input of the first layer (CLS first in every one). Return the
    states at the indices `layers` (LLaVA-1.5: (-2,)), with CLS dropped when strategy is "default"
    and kept when it is "full", concatenated along the width: (N, P, D * len(layers))."""
    raise NotImplementedError(
        "For each i in layers take hidden_states[i], drop token 0 ([:, 1:]) if strategy == 'default', "
        "and torch.cat the pieces along dim=-1. Index -2 is the OUTPUT of the second-to-last layer: "
        "LLaVA skips the last one, whose states CLIP shaped for its contrastive CLS, not for patches.")


def splice_image_features(embeds, slots, features):
    """embeds (B, T, H): the LLM's input embeddings; slots (B, T) bool: True at every <image>
    placeholder; features (N, P, H): P projected patch features for each of N images. Return a new
    tensor with the features written into the placeholders, in reading order (row by row, left to
    right): the first image's P features fill the first P placeholders, and so on. Keep the graph:
    gradients must reach `features`."""
    raise NotImplementedError(
        "Flatten the features to (N * P, H) and write them where slots is True, in order: "
        "embeds.masked_scatter(slots[..., None], flat) does exactly that (or index with "
        "slots.nonzero() and index_put). Never write into `embeds` in place.")


def tokens_with_labels(tokenizer, text, spans):
    """Tokenize `text` ONCE (tokenizer.tok.encode(text, add_special_tokens=False), a `tokenizers`
    Encoding with .ids and .offsets, the character range [start, end) of each token) and return
    (ids, labels): a token's label is its id where the token overlaps one of the character spans
    [a, b) of the answers, and -100 elsewhere."""
    raise NotImplementedError(
        "enc = tokenizer.tok.encode(text, add_special_tokens=False); for each id and (s, e) in "
        "zip(enc.ids, enc.offsets), label it with the id if any(s < b and e > a for a, b in spans), "
        "else -100. One tokenization for both lists: re-tokenizing each turn to count its length is "
        "what silently zeroed LLaVA's loss ('tokenization mismatch').")
