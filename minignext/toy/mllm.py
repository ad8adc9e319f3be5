"""The language side of training a toy multimodal LLM, shared by the toy LLaMA (train_llm), NExT-GPT's
stages (train_nextgpt) and the systems that follow them.

Labels follow the Hugging Face convention: `labels` lines up with the input ids, -100 where nothing
is learnt, and the loss shifts them by one (logits at t predict the label at t + 1).

    pad_batch     right-padded ids and labels
    answer_ce     next-token cross-entropy on the labelled tokens only (NExT-GPT trains the answers),
                  weighted across processes by their token counts
    answer_loss   the same from the last hidden states, the LM head run on the labelled positions only
    by_length     micro-batches of similar length, so long multi-turn batches carry little padding
    batch_answer_loss  answer_loss over a batch's micro-batches, one mean over all its answers
    scaled_adam   Adam with some parameters at a multiple of the rate (a connector next to LoRA or an LLM)
    splice        soft tokens (projected media embeddings) written into the input embeddings
    media_bank    frozen ImageBind embeddings of rendered media, computed once before training
    image_dialogue  a dialogue about one image (LLaVA's and PandaGPT's instruction data)
    tokens_with_labels  one tokenization of a text, labels on the characters of its answers
"""

import torch
import torch.nn.functional as F

from minignext.toy import world
from minignext.toy.train_imagebind import imagebind_input
from minignext.toy.trainer import ADAM_BETAS


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


def answer_ce(logits, labels, args=None):
    """Next-token cross-entropy where labels != -100: logits at t predict the label at t + 1. With the
    RunArgs of one of several processes, this share's part of the global batch's mean (RunArgs.mean):
    the shares hold different numbers of labelled tokens."""
    logits, labels = logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()
    if args is None or args.world_size == 1:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return args.mean(total, (labels != -100).sum())


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
    return embeds.index_put((torch.tensor(rows, device=embeds.device), torch.tensor(positions, device=embeds.device)),
                            vectors.to(embeds.dtype))


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


def image_dialogue(rng, split="train", phrasing="train", max_turns=3) -> list[world.Turn]:
    """A dialogue about one image, like the instruction data of LLaVA and PandaGPT: the image comes
    with a request to describe it, then up to max_turns - 1 follow-ups ask for its colour or its
    shape again, or make small talk."""
    first = world.turn("describe_image", rng, phrasing, split)
    turns = [first]
    for _ in range(int(rng.integers(max_turns))):
        kind = ("ask_first_colour", "ask_first_shape", "chat")[rng.integers(3)]
        turns.append(world.turn(kind, rng, phrasing, split, first=first.user_media, last=first.user_media))
    return turns


def tokens_with_labels(tokenizer, text, spans) -> tuple[list, list]:
    """`text` tokenized whole, as a prompt is, and its labels: a token's id where the token overlaps
    one of the character `spans` [a, b), -100 elsewhere. Counting on the one tokenization leaves no
    room for a mismatch between the ids and the labels."""
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    labels = [i if any(s < b and e > a for a, b in spans) else -100 for i, (s, e) in zip(enc.ids, enc.offsets)]
    return enc.ids, labels


def batch_answer_loss(examples, states, head, max_tokens=None):
    """The cross-entropy on the answers of a whole batch, over its length-sorted micro-batches
    (by_length): `states(group)` gives a micro-batch's (last hidden states, labels), and the LM head
    `head` runs on the labelled positions only. The mean is over every labelled token of the batch."""
    total, labelled = 0.0, 0
    for group in by_length(examples, max_tokens):
        hidden, labels = states(group)
        total = total + answer_loss(head, hidden, labels, reduction="sum")
        labelled += int((labels[:, 1:] != -100).sum())
    return total / max(1, labelled)


def scaled_adam(params, scaled, lr, lr_scale):
    """Adam with the kit's betas over `params`; those in `scaled` (parameters) learn at lr_scale times
    the rate, through the group's "lr_scale" that trainer.Run applies at every step."""
    ids = {id(p) for p in scaled}
    groups = [{"params": [p for p in params if id(p) not in ids]},
              {"params": [p for p in params if id(p) in ids], "lr_scale": lr_scale}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, betas=ADAM_BETAS)
