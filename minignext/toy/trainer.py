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

The same loops run on several processes under torchrun (minignext.training.distributed): with
`RunArgs.from_env()` each process knows its rank among world_size. Every rank draws the same
global batch of a step and trains on its share, `args.shard(batch)`; the loss of a share is
`run.forward(fn, *modules, ...)`, computed inside DDP (the default) or, with fsdp=True and for the
runs that hold an LLM, FSDP; `args.mean(total, count)` and `args.gather(x)` weight the shares so
that N ranks take exactly the step one process takes on the whole batch. Torch's own generator
(dropout, drop-path) is seeded per rank from the one seed. Only rank 0 logs, shows progress and
writes files; FSDP runs checkpoint their shards (state.dcp/, torch.distributed.checkpoint), and at
the end of a run the loop's modules hold the whole trained weights again, which the parts save
in their single-file layouts.
"""

import json
import math
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minignext.training import distributed
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
    fsdp: bool = False              # FSDP (full shard) instead of DDP for the runs that hold an LLM
    device: str = "cpu"             # where the real-size path trains (cuda:LOCAL_RANK); the toy parts use the CPU
    stop_after: int | None = None   # stop each run after this many of its steps, resumably (a job's share)
    save_every: int | None = None   # checkpoint every this many steps (None: Run.SAVE_EVERY)

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int; got {self.seed!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be a positive fraction of the full schedule; got {self.scale!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank {self.rank} of {self.world_size}")
        for name in ("stop_after", "save_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of steps or None; got {value!r}")
        self.runs_dir = Path(self.runs_dir)

    @classmethod
    def from_env(cls, **fields) -> "RunArgs":
        """The arguments of this process as torchrun started it (RANK, WORLD_SIZE, LOCAL_RANK; one
        process alone without them). device="cuda" means this process's own GPU, cuda:LOCAL_RANK."""
        rank, world, local = distributed.environment()
        if fields.get("device") == "cuda":
            fields["device"] = f"cuda:{local}"
        return cls(rank=rank, world_size=world, **fields)

    @property
    def main(self) -> bool:
        """Rank 0, the one process that logs and writes files."""
        return self.rank == 0

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

    def mean(self, total, count):
        """The loss of this rank's share for a mean over the global batch: `total` is summed over the
        share's `count` items (tokens, pixels). The ranks' counts differ (a share's answers are longer
        or shorter); this weights each share by its count, so that the ranks' average, which DDP and
        FSDP take of the gradients, is the global mean. total / count in one process."""
        return distributed.mean(total, count, self.world_size)

    def gather(self, x):
        """The global batch of a tensor whose rows are this rank's share (x = batch[rank::world_size]),
        in batch order, for a loss that needs the whole batch (InfoNCE). Every rank computes the same
        loss on it; gradients reach each rank's own rows."""
        return distributed.gather(x, self.rank, self.world_size)

    def on_main(self, fn, *args, **kwargs):
        """fn(*args) on rank 0 only (writing files), then every rank waits for it; its result on rank 0."""
        out = fn(*args, **kwargs) if self.main else None
        distributed.barrier()
        return out

    def sample(self, stream: str, step: int, n: int, batch: int) -> list[int]:
        """The indices of step's global batch among n items, a distributed sampler that needs no state:
        epoch after epoch of a permutation of range(n) drawn from `stream`, `batch` items a step, so
        that an epoch sees every item once. The same on every rank; each keeps its share (shard)."""
        orders, out = {}, []
        for position in range(step * batch, (step + 1) * batch):
            epoch, k = divmod(position, n)
            if epoch not in orders:
                orders[epoch] = self.rng(stream, epoch).permutation(n)
            out.append(int(orders[epoch][k]))
        return out

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


class RunStopped(Exception):
    """A run stopped after RunArgs.stop_after of its steps, checkpointed; the same command resumes it."""


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a training step frees for the next step's tensors.

    By default every buffer above a few MB is mapped fresh from the kernel and unmapped when freed,
    so each step of an LLM on the CPU touches hundreds of MB of new pages: on two cores a fifth of a
    step went to the kernel, zeroing pages (7 million page faults in 16 steps of the smol recipe's
    stage 3, 1.7 million with this, and the steps 9% faster). The memory a run reaches once stays
    with the process until it ends. False, doing nothing, where the C library is not glibc."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 31))


def launched(args: RunArgs, fn, *fn_args, **fn_kwargs):
    """fn(...) as one of the processes torchrun started (or alone): the process group joined before and
    left after, with freed memory kept for reuse (keep_freed_memory). A run stopped by stop_after ends
    it quietly, rank 0 saying so, and gives None."""
    keep_freed_memory()
    distributed.setup(args.device)
    try:
        return fn(*fn_args, **fn_kwargs)
    except RunStopped as e:
        if args.main:
            print(e, flush=True)
        return None
    finally:
        distributed.teardown()


def holds_llm(modules: dict) -> bool:
    from minignext.llama import LlamaDecoderLayer

    return any(isinstance(m, LlamaDecoderLayer) for module in modules.values() for m in module.modules())


class Run:
    """Book-keeping for one training run: `for step in run.steps(): ... run.log(loss)`.

    With resume=True a run continues from its last checkpoint (saved every SAVE_EVERY steps and at
    the end); the loss log is kept across resumes. On several processes (args.world_size > 1) the
    modules train under DDP, or FSDP when args.fsdp and they hold an LLM (see the module docstring);
    compute each step's loss with `run.forward`. save_frozen=False leaves the frozen parameters out
    of the checkpoints (they never change; a 7B LLM's would dwarf what trains); unused_params=True
    when a step may leave some trained parameters unused (distributed.DataParallel)."""

    SAVE_EVERY = 200

    def __init__(self, name, modules: dict, optimizer, total_steps, peak_lr, warmup, resume=True,
                 progress_bar=True, runs_dir=RUNS_DIR, args: RunArgs | None = None, save_frozen=True,
                 unused_params=False):
        self.name, self.modules, self.optimizer = name, modules, optimizer
        self.total, self.peak_lr, self.warmup = total_steps, peak_lr, warmup
        self.args = args or RunArgs(resume=resume, progress=progress_bar, runs_dir=runs_dir)
        self.save_frozen, self.every = save_frozen, self.args.save_every or self.SAVE_EVERY
        self.dir = Path(runs_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress_bar = progress_bar and self.args.main
        self.step, self.history = 0, []
        self.started, self.finished = time.perf_counter(), None
        self.parallel = None
        if self.args.world_size > 1:
            fsdp = self.args.fsdp and holds_llm(modules)
            self.parallel = distributed.DataParallel(modules, optimizer, fsdp, self.args.device, unused_params)
        saved = [f for f in ("state.pt", "state.dcp") if (self.dir / f).exists()]
        if resume and saved:
            self._load(saved[0])
        elif self.args.main and (self.dir / "loss.jsonl").exists():
            (self.dir / "loss.jsonl").unlink()
        self.resumed_at = self.step         # 0 for a fresh run
        distributed.barrier()

    @classmethod
    def start(cls, part, args: RunArgs, modules: dict, optimizer, full_steps, peak_lr, warmup,
              save_frozen=True, unused_params=False) -> "Run":
        """The run `args.name(part)`: `args.steps(full_steps)` steps, warmup_steps(..., `warmup`). A run
        that starts afresh seeds torch's global generator (dropout, drop-path) from its own stream, per
        rank on several processes; one that resumes restores the generator's state from its checkpoint."""
        total = args.steps(full_steps)
        torch.manual_seed(args.seed_of(f"{part}/global", *([args.rank] if args.world_size > 1 else [])))
        return cls(args.name(part), modules, optimizer, total, peak_lr, warmup_steps(total, warmup),
                   resume=args.resume, progress_bar=args.progress, runs_dir=args.runs_dir, args=args,
                   save_frozen=save_frozen, unused_params=unused_params)

    def forward(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), the step's loss (or a tuple starting with it). On several processes it
        runs as the forward of DDP or FSDP over the run's modules, which must reach fn as arguments."""
        if self.parallel is None:
            return fn(*args, **kwargs)
        return self.parallel.forward(fn, *args, **kwargs)

    def steps(self):
        bar = progress(range(self.step, self.total), desc=self.name, enabled=self.progress_bar)
        first = self.step
        for step in bar:
            self.step = step
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, self.total, self.peak_lr, self.warmup) * group.get("lr_scale", 1.0)
            yield step
            if self.history:
                bar.set_postfix(f"loss {self.history[-1]['loss']:.4f}")
            done = step + 1
            stop = self.args.stop_after is not None and done - first >= self.args.stop_after and done < self.total
            if stop or (done % self.every == 0 and done < self.total):
                self.step = done
                self._save()
            if stop:
                raise RunStopped(f"{self.name} stopped after step {done} of {self.total} (stop_after="
                                 f"{self.args.stop_after}); run the same command again to resume it")
        self.step = self.total
        self._save()
        if self.parallel is not None:
            self.parallel.finish()
        self.finished = time.perf_counter()

    def log(self, loss, **extra):
        """Record the step's loss (and named extras), averaged over the ranks; rank 0 writes it."""
        values = distributed.average([float(loss)] + [float(v) for v in extra.values()])
        row = {"step": self.step, "loss": values[0], **dict(zip(extra, values[1:]))}
        self.history.append(row)
        if self.args.main:
            with open(self.dir / "loss.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    @property
    def seconds(self):
        """Wall time from the start of this run (or this resume) to the end of its steps, or to now."""
        return (self.finished or time.perf_counter()) - self.started

    def timing(self) -> dict:
        """For a training record: the seconds of this process's steps, and the step a resumed run
        started from (its earlier steps' time is not in `seconds`)."""
        return {"seconds": round(self.seconds, 1), **self.resumed()}

    def resumed(self) -> dict:
        """{"resumed_at_step": n} for a run that resumed at step n, {} for a fresh one."""
        return {"resumed_at_step": self.resumed_at} if self.resumed_at else {}

    def mean_loss(self):
        """The mean loss of the last 50 logged steps (None before any)."""
        tail = self.history[-50:]
        return round(sum(r["loss"] for r in tail) / len(tail), 4) if tail else None

    def _fsdp(self) -> bool:
        return self.parallel is not None and self.parallel.fsdp

    def _save(self):
        rngs = distributed.all_objects(torch.get_rng_state())       # one per rank
        if self._fsdp():        # every rank writes its shards; rank 0 the step and the generators
            partial = self.dir / "state.dcp.partial"
            self.args.on_main(shutil.rmtree, partial, ignore_errors=True)
            self.parallel.save(partial, frozen=self.save_frozen)
            self.args.on_main(self._finish_sharded, partial, rngs)
            return
        if self.args.main:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "modules": {k: self._module_state(m) for k, m in self.modules.items()}, "rng": rngs[0]}
            if len(rngs) > 1:
                state["rngs"] = rngs
            tmp = self.dir / "state.pt.partial"
            torch.save(state, tmp)
            tmp.replace(self.dir / "state.pt")
        distributed.barrier()

    def _finish_sharded(self, partial, rngs):
        torch.save({"step": self.step, "rngs": rngs}, partial / "run.pt")
        distributed.replace_folder(partial, self.dir / "state.dcp")

    def _module_state(self, module) -> dict:
        state = module.state_dict()
        if not self.save_frozen:
            frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        return state

    def _load(self, saved):
        if (saved == "state.dcp") != self._fsdp():
            raise ValueError(f"{self.dir} holds a checkpoint saved {'with' if saved == 'state.dcp' else 'without'} "
                             f"FSDP ({saved}); resume it the same way, or start afresh (--fresh)")
        if saved == "state.dcp":
            self.parallel.load(self.dir / saved, frozen=self.save_frozen)
            state = torch.load(self.dir / saved / "run.pt", weights_only=True)
        else:
            state = torch.load(self.dir / saved, weights_only=True)
            for k, m in self.modules.items():
                missing, unexpected = m.load_state_dict(state["modules"][k], strict=False)
                frozen = {n for n, p in m.named_parameters(remove_duplicate=False) if not p.requires_grad}
                if unexpected or set(missing) - (set() if self.save_frozen else frozen):
                    raise ValueError(f"{self.dir / saved} does not fit the modules of {self.name}: missing "
                                     f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
            self.optimizer.load_state_dict(state["optimizer"])
        rngs = state.get("rngs", [state.get("rng")])
        if len(rngs) == self.args.world_size:      # else each rank keeps the generator Run.start seeded
            torch.set_rng_state(rngs[self.args.rank])
        self.step = state["step"]
        if (self.dir / "loss.jsonl").is_file():
            self.history = [json.loads(line) for line in open(self.dir / "loss.jsonl")]


def optimizer_step(optimizer, loss, params, max_norm=1.0):
    """One training step: backward `loss`, clip the gradients of `params` to `max_norm` (None: no
    clipping), step. In a run under FSDP the parameters are the run's shards (optimizer.data_parallel
    maps them)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parallel = getattr(optimizer, "data_parallel", None)
    if parallel is not None:
        params = parallel.after_backward(params)
    if max_norm is not None:
        (parallel.clip if parallel is not None else torch.nn.utils.clip_grad_norm_)(params, max_norm)
    optimizer.step()


def folder_megabytes(folder) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20, 2)


def summary(out_dir, **runs: Run) -> dict:
    """What a part's train() reports once it has saved its weights into out_dir: the folder, its size,
    and per run its steps, mean loss over the last 50 steps and minutes (of this process's steps: a
    resumed run says where it started, as Run.timing does)."""
    report = {"folder": str(out_dir), "megabytes": folder_megabytes(out_dir)}
    for name, run in runs.items():
        report[name] = {"steps": run.total, "loss": run.mean_loss(), "minutes": round(run.seconds / 60, 2),
                        **run.resumed()}
    return report


def read_loss_log(name, runs_dir=RUNS_DIR) -> list[dict]:
    path = Path(runs_dir) / name / "loss.jsonl"
    return [json.loads(line) for line in open(path)] if path.is_file() else []
