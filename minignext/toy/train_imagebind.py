"""The toy ImageBind: minignext.imagebind.ImageBind (Girdhar et al. 2023, arXiv 2305.05665) with a
small config, its vision, audio and text branches aligned contrastively on the toy world.

ImageBind binds every modality to images, with the symmetric InfoNCE loss of its sec. 3.2 (eq. 1)
and a learnable temperature. NExT-GPT (Wu et al., arXiv 2309.05519) only needs the pooled
embeddings to carry the world's attributes, so here TEXT is the hub: image<->text, audio<->text and
video<->text pairs, which also gives the zero-shot text retrieval that judges the model. The world
has only 21 training objects, so a batch holds many pairs of one class; the targets therefore put
equal weight on every caption of the same class (a multi-positive InfoNCE) instead of calling
them negatives. The temperature is ImageBind's own learnable text logit scale.

Inputs go through minignext.media exactly as NExT-GPT's `encoder_input` prepares them:
    image  32x32, CLIP mean/std                                 (B, 3, 32, 32)
    video  ImageBind clips of 2 frames; a 1-s, 8-frame video gives its first and last frame
                                                                (B, S, 3, 2, 32, 32)
    audio  Kaldi fbank, 128 mel bins x 100 frames (1 s), ImageBind mean/std, 16x16 patches
                                                                (B, S, 1, 128, 100)
These settings are fields of the saved config.json (`image_size`, `video_frames`,
`audio_num_mel_bins`, `audio_target_len`), which `encoder_input` reads.

Text uses a word-level CLIP-style tokenizer over the world's vocabulary (the words of
minignext.toy.decoder_text.vocabulary()), ordered so that the end token has the largest id:
ImageBind's text head pools at argmax(ids), as CLIP's BPE vocabulary guarantees.

On disk, weights/toy/imagebind/: config.json (the official constructor names), model.safetensors
(the official key layout, fp16) and tokenizer.json + tokenizer_config.json (CLIPTokenizer).

    python -m minignext.toy.train foundations --only imagebind
    python -m minignext.toy.eval foundations --only imagebind
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from minignext import media, weights
from minignext.clip import CLIP_SPLIT, CLIPTokenizer
from minignext.imagebind import ImageBind, ImageBindConfig
from minignext.toy import world
from minignext.toy.decoder_text import vocabulary
from minignext.toy.trainer import ADAM_BETAS, TOY_DIR, Run, RunArgs, optimizer_step, summary

OUT_DIR = TOY_DIR / "imagebind"
PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 16
MODEL = dict(image_size=32, video_frames=2, kernel_size=(2, 4, 4), audio_num_mel_bins=128, audio_target_len=100,
             audio_kernel_size=16, audio_stride=16, out_embed_dim=64,
             vision_embed_dim=64, vision_num_blocks=3, vision_num_heads=4,
             audio_embed_dim=64, audio_num_blocks=3, audio_num_heads=4, audio_drop_path=0.1,
             text_embed_dim=64, text_num_blocks=2, text_num_heads=4, context_length=CONTEXT_LENGTH,
             modalities=("vision", "text", "audio"))
SCHEDULE = dict(steps=1500, peak_lr=2e-3, warmup=50, image_batch=48, audio_batch=32, video_batch=48,
                images=3000, sounds=2400, videos=3000)


def build_tokenizer() -> CLIPTokenizer:
    """0 padding (as ImageBind's tokenizer pads), 1 unknown, the words, then start and end."""
    vocab = {t: i for i, t in enumerate([PAD, UNK] + vocabulary() + [BOS, EOS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(r"\s+"), behavior="removed")])
    return CLIPTokenizer(tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=CONTEXT_LENGTH)


def model_config(tokenizer: CLIPTokenizer) -> ImageBindConfig:
    return ImageBindConfig(vocab_size=tokenizer.tokenizer.get_vocab_size(), **MODEL)


# ---------------------------------------------------------------- media, as encoder_input prepares them

_MEAN, _STD = torch.tensor(media.CLIP_MEAN).view(3, 1, 1), torch.tensor(media.CLIP_STD).view(3, 1, 1)


def image_input(images) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> (B, 3, 32, 32); at the native size media.preprocess_image only normalises."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    return (x - _MEAN) / _STD


def video_input(videos) -> torch.Tensor:
    """uint8 (B, 8, 32, 32, 3) -> (B, 1, 3, 2, 32, 32). A 1-s video is shorter than ImageBind's 2-s
    clips, so all 5 clips x 3 crops of media.video_to_imagebind_clips are the same: its first and
    last frame. One copy gives the same (averaged) embedding."""
    v = torch.as_tensor(videos)[:, [0, -1]].permute(0, 4, 1, 2, 3).float() / 255   # (B, 3, 2, H, W)
    return ((v - _MEAN[:, None]) / _STD[:, None])[:, None]


def audio_input(sound) -> torch.Tensor:
    """One waveform (16 kHz) -> (1, 1, mels, frames); the 3 clips of encoder_input are identical
    copies for a 1-s sound, so one is enough."""
    return media.waveform_to_imagebind_audio(torch.as_tensor(sound)[None], world.SAMPLE_RATE, clips=1,
                                             num_mel_bins=MODEL["audio_num_mel_bins"],
                                             target_length=MODEL["audio_target_len"])


def imagebind_input(modality, batch) -> torch.Tensor:
    """A rendered batch (world.render_batch) -> ImageBind's input for `modality`."""
    if modality == "image":
        return image_input(batch)
    if modality == "video":
        return video_input(batch)
    return torch.cat([audio_input(wave) for wave in batch])


def make_bank(modality, n, rng):
    """n rendered training media as model inputs, and the media. Videos come in groups of four: one
    object in all four directions, so that a batch of whole groups can only be told apart by the motion."""
    if modality == "video":
        items = [world.Media("video", o, d) for _ in range(n // 4)
                 for o in [world.sample_object(rng, "train")] for d in world.DIRECTIONS]
    else:
        items = world.sample_media(modality, n, rng)
    return imagebind_input(modality, world.render_batch(items, rng)), items


ATTRIBUTE_WORDS = {w for group in (world.COLOURS, world.PITCHES, world.CONTOURS, world.CONTOUR_VERBS.values())
                   for w in group}
ATTRIBUTE_WORDS |= {w for table in (world.SHAPE_WORDS, world.DIRECTION_WORDS)
                    for phrases in table.values() for p in phrases for w in p.split()}
FILLER_WORDS = [w for w in vocabulary() if w.isalpha() and w not in ATTRIBUTE_WORDS]


def add_fillers(caption, rng, p=0.3):
    """With probability p, insert 1-3 words that name no attribute, so that the text branch learns to
    read the attributes and ignore phrasing it has not seen."""
    return world.insert_fillers(caption, rng, FILLER_WORDS, p, most=3)


def class_id(obj, direction=None):
    return obj.index * 4 + (world.DIRECTIONS.index(direction) if direction else 0)


# ---------------------------------------------------------------- training

def info_nce(media_emb, text_emb, labels, scale):
    """Symmetric InfoNCE (ImageBind eq. 1, both directions) with every same-class pair a positive."""
    logits = scale * media_emb @ text_emb.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))  # `same` is symmetric


def sincos_positions(grid, dim) -> torch.Tensor:
    """(1, 1 + h * w, dim): a 2-D sine-cosine table (MAE, He et al. 2021), zeros for the class token.
    The vision position table starts from it instead of noise: telling "left" from "right" needs
    positions that already know where they are."""
    _, h, w = grid
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    angles = [c.reshape(-1, 1) * freqs for c in (ys, xs)]
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def logit_scale(model):
    return model.modality_postprocessors["text"][1].log_logit_scale.exp().clamp(max=100.0)


def train(args: RunArgs, out_dir=None) -> dict:
    out_dir = Path(out_dir or OUT_DIR)
    s = SCHEDULE
    tokenizer = build_tokenizer()
    torch.manual_seed(args.seed_of("imagebind/init"))
    model = ImageBind(model_config(tokenizer))
    with torch.no_grad():
        model.modality_preprocessors["vision"].pos_embedding_helper.pos_embed.copy_(
            sincos_positions(model.config.vision_grid, model.config.vision_embed_dim))
    banks = {m: make_bank(m, args.count(s[key], least=32), args.rng(f"imagebind/{m}-bank"))
             for m, key in (("image", "images"), ("audio", "sounds"), ("video", "videos"))}
    sizes = {"image": s["image_batch"], "audio": s["audio_batch"], "video": s["video_batch"]}
    branch = {"image": "vision", "video": "vision", "audio": "audio"}
    opt = torch.optim.AdamW(model.parameters(), lr=s["peak_lr"], betas=ADAM_BETAS, weight_decay=0.05)
    run = Run.start("imagebind", args, {"model": model}, opt, s["steps"], s["peak_lr"], s["warmup"])
    model.train()
    for step in run.steps():
        rng = args.rng("imagebind/batches", step)      # the batch depends on the step only: resumable
        losses = {}
        for modality, (x, items) in banks.items():
            if modality == "video":                       # whole groups of four directions
                pick = (4 * rng.integers(len(items) // 4, size=sizes[modality] // 4)[:, None] + np.arange(4)).ravel()
            else:
                pick = rng.integers(len(items), size=sizes[modality])
            captions = [add_fillers(items[i].caption(rng), rng) for i in pick]
            labels = torch.tensor([class_id(items[i].obj, items[i].direction) for i in pick])
            emb = model.embed(branch[modality], x[pick])
            text = model.embed("text", tokenizer(captions))
            losses[modality] = info_nce(emb, text, labels, logit_scale(model))
        loss = sum(losses.values())
        optimizer_step(opt, loss, model.parameters())
        run.log(loss.item(), **{k: v.item() for k, v in losses.items()}, scale=logit_scale(model).item())
    model.eval()
    save(out_dir, model, tokenizer, overwrite=True)
    return summary(out_dir, model=run)


def save(folder, model: ImageBind, tokenizer: CLIPTokenizer, dtype=torch.float16, overwrite=False):
    folder = Path(folder)
    config_path = folder / "config.json"
    if config_path.exists() and not overwrite:
        raise FileExistsError(f"{config_path} exists; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    weights.save_safetensors(state, folder / "model.safetensors", overwrite=overwrite)
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
                "model_max_length": CONTEXT_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def load(folder=None) -> tuple[ImageBind, CLIPTokenizer]:
    folder = Path(folder or OUT_DIR)
    return ImageBind.from_pretrained(folder, dtype=torch.float32), CLIPTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------- evaluation

def class_captions(modality, phrasing="test"):
    """One caption per class (all 24 objects, x 4 directions for video), and the class ids."""
    dirs = world.DIRECTIONS if modality == "video" else (None,)
    pairs = [(o, d) for o in world.all_combinations() for d in dirs]
    rng = None if phrasing == "train" else world.make_rng(0)     # test phrasings: one template each
    return [world.caption(o, rng, modality, d, phrasing) for o, d in pairs], [class_id(o, d) for o, d in pairs]


@torch.inference_mode()
def retrieval_accuracy(model, tokenizer, modality, n, seed, split):
    """Top-1 zero-shot classification of n media among every class caption, each medium prepared by
    NExT-GPT's own encoder_input."""
    from minignext.systems.nextgpt import encoder_input

    captions, ids = class_captions(modality, "test")
    text = model.embed("text", tokenizer(captions))
    rng = world.make_rng(seed)
    right = []
    for _ in range(n):
        obj = world.sample_object(rng, split)
        direction = world.DIRECTIONS[rng.integers(4)] if modality == "video" else None
        item = world.Media(modality, obj, direction).render(rng)
        source = {"audio": lambda: (torch.from_numpy(item)[None], world.SAMPLE_RATE),
                  "image": lambda: Image.fromarray(item), "video": lambda: item}[modality]()
        x = encoder_input(model, modality, source)
        emb = model.embed("audio" if modality == "audio" else "vision", x)
        right.append(ids[int((emb @ text.T).argmax())] == class_id(obj, direction))
    return float(np.mean(right))


def evaluate(quick=False, seed=1234):
    from minignext.toy.eval import Metric

    model, tokenizer = load()
    n = 24 if quick else 240
    metrics = []
    for modality in ("image", "audio", "video"):
        classes = 24 * (4 if modality == "video" else 1)
        acc = retrieval_accuracy(model, tokenizer, modality, n, seed, "train")
        metrics.append(Metric(f"toy ImageBind {modality} -> text top-1", acc, 0.95, n,
                              f"held-out phrasings, among {classes} captions"))
        acc = retrieval_accuracy(model, tokenizer, modality, n // 2, seed + 1, "heldout")
        metrics.append(Metric(f"toy ImageBind {modality} -> text top-1", acc, None, n // 2,
                              "held-out combinations"))
    return metrics
