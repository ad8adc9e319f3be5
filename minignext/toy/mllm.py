"""The language side of training a toy multimodal LLM, shared by the toy LLaMA (train_llm), NExT-GPT's
stages (train_nextgpt) and the systems that follow them.

Labels follow the Hugging Face convention: `labels` lines up with the input ids, -100 where nothing
is learnt, and the loss shifts them by one (logits at t predict the label at t + 1).

    pad_batch     right-padded ids and labels
    answer_ce     next-token cross-entropy on the labelled tokens only (NExT-GPT trains the answers)
    answer_loss   the same from the last hidden states, the LM head run on the labelled positions only
    by_length     micro-batches of similar length, so long multi-turn batches carry little padding
    splice        soft tokens (projected media embeddings) written into the input embeddings
    media_bank    frozen ImageBind embeddings of rendered media, computed once before training
"""

import torch
import torch.nn.functional as F

from minignext.toy import world
from minignext.toy.train_imagebind import imagebind_input


def pad_batch(seqs, labels=None, pad_id=0):
    """Right-padded ids (B, T) and labels (B, T): `labels` (default: the ids themselves) with -100 on the
    padding. Right padding needs no attention mask: under a causal mask no real token ever sees the
    padding after it."""
    labels = seqs if labels is None else labels
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    out = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        out[i, :len(lab)] = torch.tensor(lab)
    return ids, out


def answer_ce(logits, labels):
    """Next-token cross-entropy where labels != -100: logits at t predict the label at t + 1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def answer_loss(head, hidden, labels, reduction="mean"):
    """answer_ce(head(hidden), labels), with the head run only where a label is: the same value,
    without the (B, T, vocab) logits of every position."""
    keep = labels[:, 1:] != -100
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[:, 1:][keep], reduction=reduction)


def by_length(examples, max_tokens=None) -> list[list]:
    """Examples ({"ids": ...}) in micro-batches of similar length, each padded to at most `max_tokens`
    positions (one example alone may exceed it); None: one batch as given."""
    if max_tokens is None:
        return [examples]
    groups, group = [], []
    for e in sorted(examples, key=lambda e: len(e["ids"])):
        if group and (len(group) + 1) * len(e["ids"]) > max_tokens:
            groups.append(group)
            group = []
        group.append(e)
    return groups + [group] if group else groups


def splice(embeds, rows, positions, vectors):
    """`embeds` (B, T, D) with vectors[i] (D,) written at (rows[i], positions[i]); index_put keeps the
    graph, so gradients reach whatever made the vectors (the input projection)."""
    return embeds.index_put((torch.tensor(rows), torch.tensor(positions)), vectors.to(embeds.dtype))


@torch.no_grad()
def embed_media(encoder, modality, batch) -> torch.Tensor:
    """(N, D) ImageBind embeddings of a rendered batch (world.render_batch)."""
    return encoder.embed("audio" if modality == "audio" else "vision", imagebind_input(modality, batch))


def media_bank(encoder, modalities, rng, split="train", per_key=8) -> dict:
    """{(modality, obj, direction): (per_key, D)} frozen ImageBind embeddings of freshly rendered media,
    for every object of `split` (and every direction, for videos): the training loop looks them up
    instead of running the encoder."""
    bank = {}
    for modality in modalities:
        for obj in world.SPLITS[split]():
            for direction in (world.DIRECTIONS if modality == "video" else (None,)):
                m = world.Media(modality, obj, direction)
                bank[(modality, obj, direction)] = embed_media(encoder, modality, world.render_batch([m] * per_key, rng))
    return bank
