"""A user's own words: the toy world's held-out conversations, played through the public `chat`.

The cases in data/user_heldout.json were written from the world's vocabulary alone, by writers who
never saw the training grammar, and frozen before any model was trained on user-style data. Each
case is a conversation: every user turn may attach a medium and may say what the answer must name
(`expect.text`) and which media it must make (`expect.make`; [] means none at all). The model
answers every turn live, its own earlier answers staying in the history, as in `minignext chat`.
Media are projected by `chat(decode=False)` and decoded afterwards in batches by the model's own
decoders at their own sampling settings; the analytic checkers judge text and media.

    python -m minignext.toy.eval users [--preset toy]
"""

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minignext.systems.nextgpt import Conversation
from minignext.toy import checkers, world

CASES = Path(__file__).parent / "data" / "user_heldout.json"
KEYS = {"image": ("colour", "shape"), "audio": ("pitch", "contour"), "video": ("colour", "shape", "direction")}
# what a made medium is judged on (a moving object's shape is not judged; see checkers.check_video)
JUDGED = {"image": ("colour", "shape"), "audio": ("pitch", "contour"), "video": ("colour", "direction")}


def load_cases(path=CASES) -> list[dict]:
    return json.loads(Path(path).read_text())["cases"]


def medium(spec: dict) -> world.Media:
    """{"modality": ..., attributes} -> the world's Media (a sound's object through the mapping)."""
    modality = spec["modality"]
    if modality == "audio":
        return world.Media("audio", world.Obj.from_sound(spec["pitch"], spec["contour"]))
    return world.Media(modality, world.Obj(spec["colour"], spec["shape"]), spec.get("direction"))


def source(m: world.Media, rng):
    """A rendered medium in the form chat takes (PIL image, (waveform, rate), frames)."""
    from PIL import Image

    x = m.render(rng)
    if m.modality == "image":
        return Image.fromarray(x)
    return (torch.from_numpy(x), world.SAMPLE_RATE) if m.modality == "audio" else x


@dataclass
class TurnResult:
    case: str
    direction: str
    index: int                      # turn number within its conversation
    expect: dict | None
    text: str
    made: list                      # [(modality, conditioning)] in the order the answer made them
    media_ok: list = field(default_factory=list)   # per expected medium, filled by judge_media

    @property
    def made_as_asked(self) -> bool:
        """Exactly the asked media, by modality and count (none when none was asked)."""
        want = Counter(m["modality"] for m in self.expect["make"])
        return Counter(m for m, _ in self.made) == want

    @property
    def text_ok(self) -> bool:
        want = self.expect.get("text") or {}
        return not want or checkers.check_text(self.text, want=want).ok

    @property
    def ok(self) -> bool:
        return self.text_ok and self.made_as_asked and all(self.media_ok)


def play(model, case, rng, max_new_tokens=64) -> list[TurnResult]:
    """Answer every turn of a case through model.chat; the earlier answers stay in the history."""
    conv, results = Conversation(), []
    for i, turn in enumerate(case["turns"]):
        spec = turn.get("media")
        attach = {spec["modality"]: [source(medium(spec), rng)]} if spec else {}
        conv.user(turn["user"], **attach)
        reply = model.chat(conv, max_new_tokens=max_new_tokens, decode=False, progress=False)
        results.append(TurnResult(case["id"], case["direction"], i, turn.get("expect"), reply.text,
                                  list(reply.conditioning)))
    return results


def judge(sample, spec: dict) -> bool:
    want = {k: spec[k] for k in JUDGED[spec["modality"]]}
    if spec["modality"] == "image":
        return checkers.check_image(sample, want=want).ok
    if spec["modality"] == "audio":
        return checkers.check_audio(sample[0], want=want).ok
    return checkers.check_video(sample, want=want).ok


@torch.no_grad()
def judge_media(model, results, seed=0, batch=32):
    """Decode every asked medium the answers made, in batches per modality, and judge it against
    its expectation (the k-th asked medium of a modality against the k-th made one)."""
    pending = {}                                   # modality -> [(result, expectation index, cond)]
    for r in results:
        if not r.expect or not r.made_as_asked:
            continue
        made = {m: [c for mm, c in r.made if mm == m] for m in KEYS}
        r.media_ok = [False] * len(r.expect["make"])
        for k, spec in enumerate(r.expect["make"]):
            pending.setdefault(spec["modality"], []).append((r, k, made[spec["modality"]].pop(0)))
    for modality, items in pending.items():
        decoder = model.decoder(modality)
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            samples = decoder.generate(torch.cat([c for _, _, c in chunk]), seed=seed + i, progress=False)
            for (r, k, _), sample in zip(chunk, samples):
                r.media_ok[k] = judge(sample, r.expect["make"][k])


SINGLE_TURN = ("image->text", "audio->text", "video->text", "text->image", "text->audio", "text->video",
               "image->audio", "audio->image", "show-no-request", "chat", "two-outputs")
THRESHOLDS = {"image->text": 0.90, "audio->text": 0.90, "video->text": 0.90, "text->image": 0.90,
              "text->audio": 0.90, "text->video": 0.85, "image->audio": 0.85,
              "media made when asked": 0.98, "no media when not asked": 0.98, "references to earlier turns": 0.95}


def table(results, thresholds=None) -> list:
    """The metrics of a set of judged turns (thresholds None: every row reported only)."""
    from minignext.toy.eval import Metric

    thresholds = thresholds or {}
    judged = [r for r in results if r.expect]
    metrics = []

    def row(name, rs, note=""):
        if rs:
            metrics.append(Metric(name, float(np.mean([r.ok for r in rs])), thresholds.get(name), len(rs), note))

    for d in SINGLE_TURN:
        row(d, [r for r in judged if r.direction == d and r.index == 0], "text and media judged by the checkers")
    asked = [r for r in judged if r.expect["make"]]
    metrics.append(Metric("media made when asked", float(np.mean([r.made_as_asked for r in asked])),
                          thresholds.get("media made when asked"), len(asked), "exactly the asked modalities"))
    quiet = [r for r in judged if not r.expect["make"]]
    metrics.append(Metric("no media when not asked", float(np.mean([not r.made for r in quiet])),
                          thresholds.get("no media when not asked"), len(quiet)))
    row("references to earlier turns", [r for r in judged if r.direction == "multi-turn" and r.index > 0],
        "later turns of multi-turn conversations, fully right")
    return metrics


def evaluate(model=None, preset="toy", cases=None, quick=False, seed=0, thresholds=None) -> list:
    """Play every case (quick: every fourth) through `model` (default: the preset), judge, tabulate.
    The smol preset is held to THRESHOLDS; the toy's table is reported (its LLM knows only the grammar)."""
    if thresholds is None and preset == "smol":
        thresholds = THRESHOLDS
    if model is None:
        from minignext.systems.nextgpt import NextGPT

        model = NextGPT.from_preset(preset, dtype=torch.float32)
    cases = load_cases() if cases is None else cases
    cases = cases[::4] if quick else cases
    rng = np.random.default_rng(seed)
    results = [r for case in cases for r in play(model, case, rng)]
    judge_media(model, results, seed)
    return table(results, thresholds)
