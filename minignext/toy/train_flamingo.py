"""The toy Flamingo: OpenFlamingo (Awadalla et al. 2023, arXiv 2308.01390; open_flamingo/train/
train_utils.py) on the toy foundations, trained as Flamingo (Alayrac et al. 2022, arXiv 2204.14198,
sec. 2-3) trains: the vision encoder and the LLM stay frozen; the perceiver resampler, the gated
cross-attention blocks and the two new embedding rows learn, from interleaved documents, to
predict the text that follows each image.

    the toy ImageBind's vision trunk (frozen; its 64 patch tokens per frame, as OpenFlamingo reads
    a frozen CLIP ViT) -> perceiver resampler (8 latents per image or video) -> tanh-gated
    cross-attention before LLM layers 1 and 3 ((i + 1) % 2 == 0) of the frozen toy LLaMA.

A video is one medium of 4 of its frames (`video_frames`), resampled together with a learned
embedding per frame (`max_num_frames`): without it the resampler sees an unordered set of patches,
and no direction.

The documents (each counts as one world example):
    dialogue  the toy LLM's own corpus with its media shown: `### Human:<image> what do you see?`
              turns about images and videos, chat and follow-ups ("what colour was the first one?")
    caption   one image or video and its caption (Flamingo's image-text and video-text pairs)
    naming    images each followed by one word, `<image>a red.<|endofchunk|><image>a blue.<|endofchunk|>`;
              the word names the colour, the shape, or (the world's mapping) the pitch or contour of the
              object's sound, one of the four per document. With its first example a document says
              which; an image alone cannot (the few-shot task of eval_flamingo).
Each `<image>` opens a chunk; `<|endofchunk|>` closes it (before the next turn that shows a medium,
and at the end). Labels follow OpenFlamingo's rule: every token from the first `<image>` on, except
the `<image>` tokens and the text between an `<|endofchunk|>` and the next `<image>`; unlike
OpenFlamingo, not `<|endofchunk|>` itself, which the frozen lm_head cannot say (`flamingo_labels`).
As in OpenFlamingo, only the rows of `<|endofchunk|>` and `<image>` of the input embeddings train (a
gradient mask), and lm_head stays frozen.

Media are encoded once by the frozen tower (a bank of rendered samples per object and direction).
What ships is OpenFlamingo's checkpoint of trainables, under its keys, as
weights/toy/flamingo/checkpoint.safetensors, next to flamingo.json (the foundations and settings).

    python -m minignext.toy.train flamingo
    python -m minignext.toy.eval flamingo
"""

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from minignext import weights
from minignext.imagebind import ImageBindVisionTower
from minignext.llama import Llama
from minignext.perceiver import media_attention_mask
from minignext.systems.flamingo import END_OF_CHUNK, IMAGE_TOKEN, OpenFlamingo, OpenFlamingoConfig
from minignext.systems.nextgpt import freeze_old_rows
from minignext.tokenizer import Tokenizer
from minignext.toy import family, world
from minignext.toy.mllm import answer_ce, pad_batch
from minignext.toy.train_imagebind import image_input
from minignext.toy.trainer import ADAM_BETAS, TOY_DIR, Run, RunArgs, optimizer_step

OUT_DIR = TOY_DIR / "flamingo"
VIDEO_FRAMES = 4                                # of a video's 8, evenly spaced: OpenFlamingo's media of T frames
CHECKPOINT = "checkpoint.safetensors"
ADDED_TOKENS = [END_OF_CHUNK, IMAGE_TOKEN]      # OpenFlamingo's order; the toy LLM has a pad token already
SETTINGS = dict(added_tokens=len(ADDED_TOKENS), cross_attn_every_n_layers=2, perceiver_depth=2,
                perceiver_heads=4, perceiver_dim_head=16, perceiver_num_latents=8, max_num_frames=VIDEO_FRAMES,
                cross_attn_heads=4, cross_attn_dim_head=32, cross_attn_ff_mult=2)
SCHEDULE = dict(steps=2000, batch=32, lr=1e-3, warmup=100, gate_lr_scale=10.0)
MIX = {"dialogue": 0.5, "caption": 0.2, "naming": 0.3}
BANK_PER_KEY = {"image": 32, "video": 12}       # rendered samples per object (and direction)
NAMINGS = ("colour", "shape", "pitch", "contour")  # what the words of a naming document say about each image
MICRO_BATCH = 16                                # documents per forward pass, sorted by length
GATE_EVERY = 20                                 # steps between the gate values kept in training.json
STORE_DTYPE = torch.float16


# ---------------------------------------------------------------- the model

def build(root=TOY_DIR, seed=0) -> tuple[OpenFlamingo, Tokenizer]:
    """An OpenFlamingo over the frozen toy LLM and ImageBind tower, with a fresh resampler and gated
    blocks (gates at 0) and the two added tokens; trainables switched on as OpenFlamingo trains."""
    root = Path(root)
    missing = [p for p in ("imagebind", "llm") if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} lacks the toy foundations {', '.join(missing)}; train them first with "
                                f"`python -m minignext.toy.train foundations`")
    tokenizer = Tokenizer.from_pretrained(root / "llm")
    llm = Llama.from_pretrained(root / "llm", dtype=torch.float32)
    tower = ImageBindVisionTower.from_pretrained(root / "imagebind", dtype=torch.float32)
    base = tokenizer.vocab_size
    if tokenizer.add_special_tokens(ADDED_TOKENS) != [base, base + 1]:
        raise ValueError(f"the toy tokenizer already holds some of {ADDED_TOKENS}")
    torch.manual_seed(seed)
    config = OpenFlamingoConfig(text_config=llm.config, vision_config=tower.config, **SETTINGS)
    model = OpenFlamingo(config, tower, llm).freeze()
    model.first_new_id = base
    return model, tokenizer


def load(folder=OUT_DIR) -> tuple[OpenFlamingo, Tokenizer]:
    """The shipped toy Flamingo: its trainables loaded strictly over the foundations flamingo.json names."""
    folder = Path(folder)
    spec = json.loads((folder / "flamingo.json").read_text())
    tower = ImageBindVisionTower.from_pretrained(folder / spec["vision_encoder"], dtype=torch.float32)
    model = OpenFlamingo.from_pretrained(folder / spec["checkpoint"], folder / spec["lang_encoder"], tower,
                                         dtype=torch.float32, **spec["settings"])
    tokenizer = Tokenizer.from_pretrained(folder / spec["tokenizer"])
    tokenizer.add_special_tokens(spec["added_tokens"])
    return model, tokenizer


def gated_layers(model) -> dict:
    """{LLM layer index: its gated cross-attention block}."""
    return {i: layer.gated_cross_attn_layer for i, layer in enumerate(model.lang_encoder.model.layers)
            if hasattr(layer, "gated_cross_attn_layer")}


def gate_values(model) -> dict:
    """tanh of every gate: {"layer1.attn": ..., "layer1.ff": ...}."""
    return {f"layer{i}.{g}": getattr(block, f"{g}_gate").tanh().item()
            for i, block in gated_layers(model).items() for g in ("attn", "ff")}


# ---------------------------------------------------------------- media

def video_frames(video) -> np.ndarray:
    """The VIDEO_FRAMES frames, evenly spaced from the first to the last, that the model reads of a video."""
    return video[np.linspace(0, len(video) - 1, VIDEO_FRAMES).round().astype(int)]


def frames_of(media: world.Media, rng) -> np.ndarray:
    """A rendered medium as uint8 frames (F, 32, 32, 3): an image is one frame, a video VIDEO_FRAMES."""
    x = media.render(rng)
    return x[None] if media.modality == "image" else video_frames(x)


@torch.no_grad()
def vision_bank(model, rng, per_key=BANK_PER_KEY) -> dict:
    """{(obj, direction): (per_key, F, patches, D)} patch tokens of freshly rendered training media from
    the frozen tower (no class token, as encode_vision_x reads them); direction None for images."""
    bank = {}
    for obj in world.train_combinations():
        for direction in (None, *world.DIRECTIONS):
            m = world.Media("image" if direction is None else "video", obj, direction)
            frames = np.stack([frames_of(m, rng) for _ in range(per_key[m.modality])])
            tokens = model.vision_encoder(image_input(frames.reshape(-1, *frames.shape[2:]))).last_hidden_state
            bank[(obj, direction)] = tokens[:, 1:].reshape(*frames.shape[:2], -1, tokens.shape[-1])
    return bank


# ---------------------------------------------------------------- documents

class Shown(NamedTuple):
    """A medium in a document, and which of its rendered samples in the bank is shown."""
    media: world.Media
    sample: int


def naming_chunk(word) -> str:
    """The text after each image of a naming document (and of the few-shot prompts)."""
    return f"a {word}."


def dialogue_document(rng, per_key=BANK_PER_KEY) -> list:
    """1-3 Vicuna-v0 turns: the first shows an image or a video; later ones show another, chat, or ask
    about the first one. A chunk closes before each later turn that shows a medium, and at the end."""
    pieces, first = [], None
    for i in range(int(rng.integers(1, 4))):
        if i and rng.random() < 0.3:
            kind = ("ask_first_colour", "ask_first_shape")[rng.integers(2)]
        else:
            kind = ("describe_image", "describe_video", "chat")[rng.choice(3, p=(0.45, 0.45, 0.1)) if i else rng.integers(2)]
        t = world.turn(kind, rng, "train", "train", first=first, last=first)
        if t.user_media is None:
            pieces.append(f"### Human: {t.user}\n")
        else:
            m = t.user_media
            pieces += ([END_OF_CHUNK] if first else []) + ["### Human:", Shown(m, int(rng.integers(per_key[m.modality]))),
                                                            f" {t.user}\n"]
            first = first or m
        pieces.append(f"### Assistant: {t.assistant}\n")
    return pieces + [END_OF_CHUNK]


def caption_document(rng, per_key=BANK_PER_KEY) -> list:
    """One image or video and its caption, as Flamingo's image-text and video-text pairs."""
    modality = ("image", "video")[rng.integers(2)]
    m = world.sample_media(modality, 1, rng)[0]
    return [Shown(m, int(rng.integers(per_key[modality]))), m.caption(rng) + ".", END_OF_CHUNK]


def naming_document(rng, per_key=BANK_PER_KEY, naming=None) -> list:
    """3-6 images, each followed by one word about it. Which attribute the words name (NAMINGS: the
    colour, the shape, or through the world's mapping the pitch or contour of its sound) is drawn
    for each document: from the second image on, only the document tells which one to say."""
    naming = naming or NAMINGS[rng.integers(len(NAMINGS))]
    pieces = []
    for obj in (world.sample_object(rng) for _ in range(int(rng.integers(3, 7)))):
        shown = Shown(world.Media("image", obj), int(rng.integers(per_key["image"])))
        pieces += [shown, naming_chunk(getattr(obj, naming)), END_OF_CHUNK]
    return pieces


DOCUMENTS = {"dialogue": dialogue_document, "caption": caption_document, "naming": naming_document}


def document(rng, per_key=BANK_PER_KEY) -> list:
    kind = list(MIX)[rng.choice(len(MIX), p=list(MIX.values()))]
    return DOCUMENTS[kind](rng, per_key)


def flamingo_labels(ids, media_id, eoc_id) -> list:
    """OpenFlamingo's labels for an interleaved document: -100 on each `<image>`, before the first one,
    and between an `<|endofchunk|>` and the next `<image>`; the chunks' text is learnt. One change: the
    `<|endofchunk|>` itself is not a label. OpenFlamingo learns it, but with an untied, frozen lm_head
    (LLaMA's) its output row stays the mean of the others, whose logit is their average and so never
    the largest: a label no model can reach, whose gradient only flattens the logits."""
    labels, inside = [], False
    for t in ids:
        if t == media_id:
            inside = True
        labels.append(t if inside and t not in (media_id, eoc_id) else -100)
        if t == eoc_id:
            inside = False
    return labels


def encode(tokenizer, pieces) -> tuple[list, list, list]:
    """A document -> ids (<s> text </s>, tokenized as one text, as chat tokenizes a prompt), labels
    and its media in order."""
    text = "".join(IMAGE_TOKEN if isinstance(p, Shown) else p for p in pieces)
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    media_id, eoc_id = (tokenizer.token_to_id(t) for t in (IMAGE_TOKEN, END_OF_CHUNK))
    shown = [p for p in pieces if isinstance(p, Shown)]
    if ids.count(media_id) != len(shown):
        raise ValueError(f"{text!r} tokenizes to {ids.count(media_id)} <image> tokens for {len(shown)} media")
    return ids, flamingo_labels(ids, media_id, eoc_id), shown


# ---------------------------------------------------------------- the loss

def resample(model, bank, shown_lists) -> torch.Tensor:
    """The perceiver's latents (B, N, n, D) for each document's media (N: the most in one document;
    a shorter document's extra slots stay 0 and no token of it ever sees them). Media of the same
    number of frames are resampled together."""
    items = [(b, j, bank[(s.media.obj, s.media.direction)][s.sample])
             for b, shown in enumerate(shown_lists) for j, s in enumerate(shown)]
    out = None
    for frames in sorted({t.shape[0] for *_, t in items}):
        group = [(b, j, t) for b, j, t in items if t.shape[0] == frames]
        latents = model.perceiver(torch.stack([t for *_, t in group])[:, None])[:, 0]
        if out is None:
            out = latents.new_zeros(len(shown_lists), max(map(len, shown_lists)), *latents.shape[1:])
        rows, slots = zip(*((b, j) for b, j, _ in group))
        out = out.index_put((torch.tensor(rows), torch.tensor(slots)), latents)
    return out


def loss_fn(model, tokenizer, docs, bank, micro=MICRO_BATCH) -> torch.Tensor:
    """Next-token cross-entropy over every labelled token of `docs`. The documents run in micro-batches
    of similar length (less padding); each adds its share of the tokens, so the loss is the batch's mean."""
    encoded = sorted((encode(tokenizer, d) for d in docs), key=lambda e: len(e[0]))
    total = sum(sum(t != -100 for t in labels[1:]) for _, labels, _ in encoded)
    loss = 0.0
    for i in range(0, len(encoded), micro):
        ids, labels, shown = zip(*encoded[i:i + micro])
        ids, labels = pad_batch(ids, labels, pad_id=model.lang_encoder.config.pad_token_id or 0)
        media = resample(model, bank, shown)
        mask = media_attention_mask(ids, model.config.media_token_id, num_media=media.shape[1])
        logits = model.lm_head(model.hidden_states(ids, media=media, media_mask=mask))
        loss = loss + answer_ce(logits, labels) * int((labels[:, 1:] != -100).sum()) / total
    return loss


# ---------------------------------------------------------------- training

def train(args: RunArgs, out_dir=None, root=TOY_DIR, bank_per_key=BANK_PER_KEY) -> dict:
    t0 = time.perf_counter()
    s = SCHEDULE
    model, tokenizer = build(root, args.seed_of("flamingo/init"))
    bank = vision_bank(model, args.rng("flamingo/vision-bank"), bank_per_key)
    rows = freeze_old_rows(model.lang_encoder.model.embed_tokens.weight, model.first_new_id)
    params = [p for p in model.parameters() if p.requires_grad]
    gates = [p for name, p in model.named_parameters() if name.endswith(("attn_gate", "ff_gate"))]
    rest = [p for p in params if all(p is not g for g in gates)]
    opt = torch.optim.Adam([{"params": rest}, {"params": gates, "lr_scale": s["gate_lr_scale"]}], lr=s["lr"],
                           betas=ADAM_BETAS)
    run = Run.start("flamingo", args, {"model": model}, opt, s["steps"], s["lr"], s["warmup"])
    model.train()
    for step in run.steps():
        rng = args.rng("flamingo/batches", step)          # the batch depends on the step only: resumable
        docs = args.shard([document(rng, bank_per_key) for _ in range(s["batch"])])
        loss = loss_fn(model, tokenizer, docs, bank)
        optimizer_step(opt, loss, params)
        run.log(loss.item(), **gate_values(model))
    model.eval()
    rows.remove()
    out = save(model, out_dir or OUT_DIR, root)
    gates = [r for r in run.history if r["step"] % GATE_EVERY == 0 or r["step"] == run.total - 1]
    record = family.write_training_record(
        out, minutes=round((time.perf_counter() - t0) / 60, 1), examples=run.total * s["batch"], steps=run.total,
        batch=s["batch"], mix=MIX, loss=run.mean_loss(), trainable=count_trainable(model),
        gates={k: [round(r[k], 4) for r in gates] for k in ("step", *gate_values(model))})
    return {"folder": str(out), "record": str(record), "steps": run.total, "loss": run.mean_loss(),
            "seconds": round(time.perf_counter() - t0, 1),
            "megabytes": round((out / CHECKPOINT).stat().st_size / 1e6, 2)}


def count_trainable(model) -> int:
    """What training changes: the resampler, the gated blocks and the two new embedding rows."""
    n = sum(p.numel() for name, p in model.named_parameters()
            if p.requires_grad and name != "lang_encoder.model.embed_tokens.weight")
    return n + model.config.added_tokens * model.config.text_config.hidden_size


def save(model, folder, root=TOY_DIR, overwrite=True) -> Path:
    """folder/{checkpoint.safetensors (OpenFlamingo's trainables, fp16), flamingo.json}."""
    folder, root = Path(folder), Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(STORE_DTYPE).contiguous() for k, v in model.trainable_state_dict().items()}
    weights.save_safetensors(state, folder / CHECKPOINT, overwrite=overwrite)
    spec = {"checkpoint": CHECKPOINT, "lang_encoder": os.path.relpath(root / "llm", folder),
            "vision_encoder": os.path.relpath(root / "imagebind", folder),
            "tokenizer": os.path.relpath(root / "llm", folder), "added_tokens": ADDED_TOKENS, "settings": SETTINGS}
    (folder / "flamingo.json").write_text(json.dumps(spec, indent=2) + "\n")
    return folder
