"""Lesson 9 solutions, written out. The library's versions: `select_features` and
`splice_image_features` in minignext/systems/llava.py, `tokens_with_labels` in minignext/toy/mllm.py
(the toy PandaGPT's and LLaVA's training data)."""

import torch


def select_features(hidden_states, layers, strategy="default"):
    # hidden_states[0] is the tower's input, so -2 is the output of the second-to-last layer
    pieces = [hidden_states[i][:, 1:] if strategy == "default" else hidden_states[i] for i in layers]
    return torch.cat(pieces, dim=-1)


def splice_image_features(embeds, slots, features):
    # masked_scatter fills the True positions in row-major order and returns a new tensor
    return embeds.masked_scatter(slots[..., None], features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))


def tokens_with_labels(tokenizer, text, spans):
    enc = tokenizer.tok.encode(text, add_special_tokens=False)       # one tokenization for both lists
    labels = [i if any(s < b and e > a for a, b in spans) else -100 for i, (s, e) in zip(enc.ids, enc.offsets)]
    return enc.ids, labels
