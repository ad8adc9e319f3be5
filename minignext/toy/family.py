"""The family table: the systems of the any-to-any family side by side in the toy world.

Every row is one system trained from the same frozen toy foundations (ImageBind, the toy LLaMA,
the decoders of lesson 7) on the same world and the same data budget, then measured on ONE shared
held-out set through the system's own public chat: the world's test phrasings (sentence frames
no training text contains) about the world's training objects.

    python -m minignext.toy.eval family [--quick]

A system joins the table with an entry in SYSTEMS naming a module that has
`family_row(cases) -> Row`: it loads the shipped toy system, answers the cases of the directions it
supports (those of `cases`, {direction: turns}, that it has) through its public chat, with the inputs `inputs(direction, cases)` renders, judges them with
`text_ok` / `media_ok`, and reports its connector and what its training cost.
"""

import importlib
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minignext.toy import checkers, world

DIRECTIONS = ("image->text", "audio->text", "video->text", "text->image", "text->audio", "text->video",
              "image->audio", "audio->image")
KINDS = {"image->text": "describe_image", "audio->text": "describe_audio", "video->text": "describe_video",
         "text->image": "make_image", "text->audio": "make_audio", "text->video": "make_video",
         "image->audio": "image_to_audio", "audio->image": "audio_to_image"}
CASES_PER_DIRECTION = 48
# Every system trains on at most this many world examples (captions, dialogues, documents) in all
# of its stages: NExT-GPT's three stages see 2000 x 32 + 1500 x 16 + 1500 x 16 = 112,000.
DATA_BUDGET = 112_000
SYSTEMS = {"NExT-GPT": "minignext.toy.eval_nextgpt",    # name -> module with family_row(cases)
           "LLaVA": "minignext.toy.train_llava", "PandaGPT": "minignext.toy.train_pandagpt",
           "MiniGPT-4": "minignext.toy.eval_minigpt4", "Flamingo": "minignext.toy.eval_flamingo",
           "AnyGPT": "minignext.toy.eval_anygpt"}
TRAINING_RECORD = "training.json"           # what a system's training writes next to its weights


def shared_cases(direction, quick=False) -> list[world.Turn]:
    """The shared held-out cases of one direction: the same for every system, every time."""
    if direction not in KINDS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    rng = np.random.default_rng([DIRECTIONS.index(direction), 1234])
    n = 8 if quick else CASES_PER_DIRECTION
    return [world.turn(KINDS[direction], rng, "test", "train") for _ in range(n)]


def inputs(direction, cases) -> list:
    """The cases' input media, rendered the same way for every system (None where a case has none):
    uint8 image (H, W, 3), float waveform at world.SAMPLE_RATE, or uint8 frames (T, H, W, 3)."""
    return [None if t.user_media is None else t.user_media.render(np.random.default_rng([DIRECTIONS.index(direction), i]))
            for i, t in enumerate(cases)]


def text_ok(turn: world.Turn, text: str) -> bool:
    return checkers.check_text(text, want=turn.user_media).ok


def media_ok(turn: world.Turn, sample) -> bool:
    """`sample`: the medium the system made for `turn` (PIL / array image, waveform or (waveform,
    rate), frames), or None when it made none."""
    want = turn.assistant_media
    if sample is None:
        return False
    if want.modality == "image":
        return checkers.check_image(sample, want=want.obj).ok
    if want.modality == "audio":
        return checkers.check_audio(sample[0] if isinstance(sample, tuple) else sample, want=want.obj).ok
    return checkers.check_video(sample, want={"colour": want.obj.colour, "direction": want.direction}).ok


@dataclass
class Row:
    system: str
    connector: str                  # what turns a medium into something the LLM reads
    tokens_per_input: str           # soft tokens (or codes, or latents) one input becomes
    trainable: int                  # parameters its training changed (new rows only, for grown matrices)
    minutes: float | None           # its training's wall time on this machine's 2 cores
    examples: int | None            # world examples its training saw (DATA_BUDGET at most)
    accuracy: dict = field(default_factory=dict)   # direction -> (fraction right, cases)
    zero_shot: tuple = ()           # directions measured although training never showed their input
    notes: str = ""


def training_record(folder) -> dict:
    """What a system's training wrote next to its weights: {"minutes", "examples", ...}, or {}."""
    path = Path(folder) / TRAINING_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_record(run, batch, trainable, points=40) -> dict:
    """What training.json keeps of one stage (a trainer.Run): steps, global batch, examples, trainable
    parameters, seconds, the final loss and the loss curve as `points` means over equal stretches."""
    losses = [r["loss"] for r in run.history]
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    curve = [[int(b), round(float(np.mean(losses[a:b])), 4)] for a, b in itertools.pairwise(edges)]
    return {"steps": run.total, "batch": batch, "examples": run.total * batch, "trainable": trainable,
            **run.timing(), "loss": run.mean_loss(), "curve": curve}


def write_training_record(folder, **record):
    """training.json: `record` (minutes, examples, stages...) and the machine's load averages over the
    last 1, 5 and 15 minutes, since the wall time of a run on shared cores depends on them."""
    record.setdefault("load_average", [round(x, 1) for x in os.getloadavg()])
    path = Path(folder) / TRAINING_RECORD
    text = json.dumps(record, indent=2)             # then every list of numbers on one line
    text = re.sub(r"\[\s+([-\d.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.write_text(text + "\n")
    return path


def rows(systems=None, quick=False, directions=DIRECTIONS) -> list[Row]:
    """One Row per system (all of SYSTEMS by default) on the cases of `directions`; each row's
    evaluation time goes to stderr."""
    out = []
    for name in systems or SYSTEMS:
        t0 = time.perf_counter()
        module = importlib.import_module(SYSTEMS[name])
        cases = {d: shared_cases(d, quick) for d in directions}
        out.append(module.family_row(cases))
        print(f"family: {name} evaluated in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return out


def format_table(table: list[Row]) -> str:
    """The table in Markdown: accuracy per direction ("-" where a system has no such input or output;
    "*" where it answers zero-shot), then each row's notes."""
    head = ["system", "connector", "tokens per input", "trainable", "minutes", "examples", *DIRECTIONS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in table:
        acc = [f"{100 * r.accuracy[d][0]:.1f}% ({r.accuracy[d][1]}){'*' if d in r.zero_shot else ''}"
               if d in r.accuracy else "-" for d in DIRECTIONS]
        minutes = f"{r.minutes:.1f}" if r.minutes is not None else "?"
        examples = f"{r.examples:,}" if r.examples is not None else "?"
        lines.append("| " + " | ".join([r.system, r.connector, r.tokens_per_input, f"{r.trainable:,}", minutes,
                                        examples, *acc]) + " |")
    notes = ["\\* zero-shot: training never showed the system an input of this modality."] * any(
        r.zero_shot for r in table) + [f"- {r.system}: {r.notes}" for r in table if r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


THRESHOLDS = {("LLaVA", "image->text"): 0.95, ("MiniGPT-4", "image->text"): 0.90,
              ("Flamingo", "image->text"): 0.90, ("AnyGPT", "image->text"): 0.90, ("AnyGPT", "text->image"): 0.90}


def metrics(table: list[Row], quick=False) -> list:
    """The table's accuracies as eval.Metric, with the thresholds of THRESHOLDS (none when quick)."""
    from minignext.toy.eval import Metric

    return [Metric(f"{r.system} {d}", v, None if quick else THRESHOLDS.get((r.system, d)), n,
                   r.connector + (", zero-shot" if d in r.zero_shot else "")) for r in table for d, (v, n) in r.accuracy.items()]


def evaluate(quick=False, systems=None) -> list:
    """The family table as metrics (python -m minignext.toy.eval family prints both)."""
    table = rows(systems, quick)
    print(format_table(table))
    return metrics(table, quick)
