"""Shared pieces of every toy training run: seeding, a warmup-cosine learning rate, a loss log,
and checkpoints that make a run resumable.

A run named NAME keeps its state in weights/toy/.runs/NAME/ (git-ignored): `state.pt` (model and
optimiser state, read back with weights_only=True) and `loss.jsonl`. The finished weights are saved
elsewhere, as safetensors, by the part that trains them.
"""

import json
import math
import time
from pathlib import Path

import torch

from minignext.utils import progress
from minignext.weights import WEIGHTS_DIR

TOY_DIR = WEIGHTS_DIR / "toy"
RUNS_DIR = TOY_DIR / ".runs"


def lr_at(step, total, peak, warmup=100, floor=0.1):
    """Linear warmup to `peak`, then cosine decay to `floor * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


class Run:
    """Book-keeping for one training run: `for step in run.steps(): ... run.log(loss)`.

    With resume=True a run continues from its last checkpoint (saved every `save_every`
    steps and at the end); the loss log is kept across resumes."""

    def __init__(self, name, modules: dict, optimizer, total_steps, peak_lr, warmup=100,
                 resume=True, save_every=200, progress_bar=True, runs_dir=None):
        self.name, self.modules, self.optimizer = name, modules, optimizer
        self.total, self.peak_lr, self.warmup = total_steps, peak_lr, warmup
        self.dir = Path(runs_dir or RUNS_DIR) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save_every, self.progress_bar = save_every, progress_bar
        self.step, self.history = 0, []
        self.started, self.finished = time.perf_counter(), None
        if resume and (self.dir / "state.pt").is_file():
            self._load()
        elif (self.dir / "loss.jsonl").exists():
            (self.dir / "loss.jsonl").unlink()

    def steps(self):
        bar = progress(range(self.step, self.total), desc=self.name, enabled=self.progress_bar)
        for step in bar:
            self.step = step
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, self.total, self.peak_lr, self.warmup) * group.get("lr_scale", 1.0)
            yield step
            if self.history:
                bar.set_postfix(f"loss {self.history[-1]['loss']:.4f}")
            if (step + 1) % self.save_every == 0 and step + 1 < self.total:
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


def summary(steps, model, run, out_dir, seconds) -> dict:
    """What a part's train() reports once it has saved its weights into out_dir."""
    return {"steps": steps, "params": sum(p.numel() for p in model.parameters()),
            "final_loss": round(run.history[-1]["loss"], 4) if run.history else None,
            "mb": round(sum(f.stat().st_size for f in Path(out_dir).iterdir()) / 1e6, 2),
            "train_seconds": round(seconds, 1), "out_dir": str(out_dir)}


def read_loss_log(name, runs_dir=None) -> list[dict]:
    path = Path(runs_dir or RUNS_DIR) / name / "loss.jsonl"
    return [json.loads(line) for line in open(path)] if path.is_file() else []
