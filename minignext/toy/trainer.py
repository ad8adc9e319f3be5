"""What every toy training run shares: its arguments, its name, its random streams, a warmup-cosine
learning rate, a loss log, and checkpoints that make it resumable.

Every part's `train(args, ...)` takes one `RunArgs` (seed, scale, resume, progress, runs folder).
A run is named `{part}-seed{seed}-scale{scale:g}` and resumes only a run of that name, so a new seed
or a new scale always trains from its own start. A run named NAME keeps its state in
RUNS_DIR/NAME/ (git-ignored): `state.pt` (model and optimiser state, read back with
weights_only=True) and `loss.jsonl`. The finished weights are saved elsewhere, as safetensors, by
the part that trains them.

Randomness comes from named streams: `args.rng("llm/batches", step)` is a numpy Generator and
`args.generator(...)` a torch Generator, both derived from the run seed and the stream's name (and
keys such as the step), so one stream never shifts another and a resumed run draws what it would
have drawn.
"""

import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minignext.utils import progress
from minignext.weights import WEIGHTS_DIR

TOY_DIR = WEIGHTS_DIR / "toy"
RUNS_DIR = TOY_DIR / ".runs"
ADAM_BETAS = (0.9, 0.95)        # the transformers' Adam betas (LLaMA sec. 2.2, NExT-GPT's stage configs)


@dataclass
class RunArgs:
    """How one training is run; `python -m minignext.toy.train` builds it from its arguments."""
    seed: int = 0
    scale: float = 1.0              # fraction of the full schedule (the notebooks and tests use < 0.02)
    resume: bool = True             # continue the run of the same name from its last checkpoint
    progress: bool = True           # a progress bar per run
    runs_dir: Path = RUNS_DIR       # run state and loss logs
    rank: int = 0                   # this process among world_size (torchrun); 0 alone
    world_size: int = 1

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int; got {self.seed!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be a positive fraction of the full schedule; got {self.scale!r}")
        self.runs_dir = Path(self.runs_dir)

    def name(self, part: str) -> str:
        """The one naming rule for runs: the part, the seed and the scale."""
        return f"{part}-seed{self.seed}-scale{self.scale:g}"

    def steps(self, full: int) -> int:
        """The steps of a run whose full schedule has `full`: scaled, at least a first and a last."""
        return max(2, int(full * self.scale))

    def count(self, full: int, least: int) -> int:
        """How many items to render for a dataset of `full` at full scale. Data shrink four times more
        slowly than the schedule, so that a short run still sees varied data."""
        return max(least, int(full * min(1.0, 4 * self.scale)))

    def shard(self, batch: list) -> list:
        """This process's share of a step's global batch: every world_size-th example from its rank.
        Every rank draws the same global batch from the step's stream and keeps its share, so the
        ranks see disjoint data and together see exactly what one process would."""
        return batch[self.rank::self.world_size]

    def seed_of(self, stream: str, *keys: int) -> int:
        """A 63-bit seed for the random stream named `stream` at `keys`. crc32, unlike hash(), gives a
        name the same number in every process."""
        entropy = np.random.SeedSequence([self.seed, zlib.crc32(stream.encode()), *keys])
        return int(entropy.generate_state(1, np.uint64)[0] >> np.uint64(1))

    def rng(self, stream: str, *keys: int) -> np.random.Generator:
        return np.random.default_rng(self.seed_of(stream, *keys))

    def generator(self, stream: str, *keys: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed_of(stream, *keys))


def lr_at(step, total, peak, warmup):
    """Linear warmup to `peak`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def warmup_steps(total, most) -> int:
    """The one warmup rule: a tenth of the run and one step, at most `most` steps."""
    return min(most, total // 10 + 1)


class Run:
    """Book-keeping for one training run: `for step in run.steps(): ... run.log(loss)`.

    With resume=True a run continues from its last checkpoint (saved every SAVE_EVERY steps and at
    the end); the loss log is kept across resumes."""

    SAVE_EVERY = 200

    def __init__(self, name, modules: dict, optimizer, total_steps, peak_lr, warmup, resume=True,
                 progress_bar=True, runs_dir=RUNS_DIR):
        self.name, self.modules, self.optimizer = name, modules, optimizer
        self.total, self.peak_lr, self.warmup = total_steps, peak_lr, warmup
        self.dir = Path(runs_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress_bar = progress_bar
        self.step, self.history = 0, []
        self.started, self.finished = time.perf_counter(), None
        if resume and (self.dir / "state.pt").is_file():
            self._load()
        elif (self.dir / "loss.jsonl").exists():
            (self.dir / "loss.jsonl").unlink()

    @classmethod
    def start(cls, part, args: RunArgs, modules: dict, optimizer, full_steps, peak_lr, warmup) -> "Run":
        """The run `args.name(part)`: `args.steps(full_steps)` steps, warmup_steps(..., `warmup`). A run
        that starts afresh seeds torch's global generator (dropout, drop-path) from its own stream; one
        that resumes restores the generator's state from its checkpoint."""
        total = args.steps(full_steps)
        torch.manual_seed(args.seed_of(f"{part}/global"))
        return cls(args.name(part), modules, optimizer, total, peak_lr, warmup_steps(total, warmup),
                   resume=args.resume, progress_bar=args.progress, runs_dir=args.runs_dir)

    def steps(self):
        bar = progress(range(self.step, self.total), desc=self.name, enabled=self.progress_bar)
        for step in bar:
            self.step = step
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, self.total, self.peak_lr, self.warmup) * group.get("lr_scale", 1.0)
            yield step
            if self.history:
                bar.set_postfix(f"loss {self.history[-1]['loss']:.4f}")
            if (step + 1) % self.SAVE_EVERY == 0 and step + 1 < self.total:
                self.step = step + 1
                self._save()
        self.step = self.total
        self._save()
        self.finished = time.perf_counter()

    def log(self, loss, **extra):
        row = {"step": self.step, "loss": float(loss), **{k: float(v) for k, v in extra.items()}}
        self.history.append(row)
        with open(self.dir / "loss.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    @property
    def seconds(self):
        """Wall time from the start of this run (or this resume) to the end of its steps, or to now."""
        return (self.finished or time.perf_counter()) - self.started

    def mean_loss(self):
        """The mean loss of the last 50 logged steps (None before any)."""
        tail = self.history[-50:]
        return round(sum(r["loss"] for r in tail) / len(tail), 4) if tail else None

    def _save(self):
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "modules": {k: m.state_dict() for k, m in self.modules.items()},
                 "rng": torch.get_rng_state()}
        tmp = self.dir / "state.pt.partial"
        torch.save(state, tmp)
        tmp.replace(self.dir / "state.pt")

    def _load(self):
        state = torch.load(self.dir / "state.pt", weights_only=True)
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        if (self.dir / "loss.jsonl").is_file():
            self.history = [json.loads(line) for line in open(self.dir / "loss.jsonl")]


def optimizer_step(optimizer, loss, params, max_norm=1.0):
    """One training step: backward `loss`, clip the gradients of `params` to `max_norm` (None: no
    clipping), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def folder_megabytes(folder) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20, 2)


def summary(out_dir, **runs: Run) -> dict:
    """What a part's train() reports once it has saved its weights into out_dir: the folder, its size,
    and per run its steps, mean loss over the last 50 steps and minutes."""
    report = {"folder": str(out_dir), "megabytes": folder_megabytes(out_dir)}
    for name, run in runs.items():
        report[name] = {"steps": run.total, "loss": run.mean_loss(), "minutes": round(run.seconds / 60, 2)}
    return report


def read_loss_log(name, runs_dir=RUNS_DIR) -> list[dict]:
    path = Path(runs_dir) / name / "loss.jsonl"
    return [json.loads(line) for line in open(path)] if path.is_file() else []
