"""Train the toy world's models from scratch on CPU.

    python -m minignext.toy.train foundations [--only imagebind,llm,...] [--seed 0] [--scale 1] [--fresh] [--lanes 2]
    python -m minignext.toy.train nextgpt [--seed 0] [--scale 1] [--fresh]
    python -m minignext.toy.train smol [...]    (NExT-GPT's stages on SmolLM2-135M-Instruct)
    python -m minignext.toy.train llava|pandagpt [--seed 0] [--scale 1] [--fresh]
    python -m minignext.toy.train minigpt4 [--seed 0] [--scale 1] [--fresh]
    python -m minignext.toy.train minigpt4-1q | minigpt4-4q     (lesson 9's ablation: 1 and 4 queries)
    python -m minignext.toy.train anygpt [...]  (toy AnyGPT: two media tokenizers, then the LLM on their codes)
    python -m minignext.toy.train flamingo [--seed 0] [--scale 1] [--fresh]

Each part lives in its own module, `minignext.toy.train_<part>`, with `train(args: RunArgs) -> dict`
that saves the part's finished weights under weights/toy/ and returns a summary. The arguments
become one RunArgs (minignext.toy.trainer): a run resumes only the run of the same part, seed and
scale (--fresh starts it over).

The foundations are small models, and two processes of one thread each keep two CPU cores busier
than one process of two threads. So with --lanes 2 (the default) they train in two phases: first
two lanes side by side, the image decoder in one and ImageBind, the LLM and the audio decoder in
the other; then the video decoder, which starts from the image decoder, alone with both threads.
Each lane is `python -m minignext.toy.train foundations --only ... --lanes 1 --threads N`, logging
to lane-PART.log in the runs folder (PART its first part), and this process shows one status line for
all of them.

Every part also trains on several processes, under torchrun, the parts one after the other (no lanes):

    torchrun --nproc_per_node 2 -m minignext.toy.train foundations --threads 1 [--fsdp]

Each step's global batch is split between the processes (DDP; with --fsdp the runs that hold an LLM
are sharded), which take the same steps one process would (minignext.toy.trainer); only ImageBind's
audio branch, whose stochastic depth each process draws for its own share, trains alike but not step
for step.
"""

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from minignext.toy.trainer import RUNS_DIR, TOY_DIR, RunArgs, launched

FOUNDATIONS = ("imagebind", "llm", "image_decoder", "audio_decoder", "video_decoder")
PHASES = ((("image_decoder",), ("imagebind", "llm", "audio_decoder")),      # two lanes side by side
          (("video_decoder",),))                                             # then one, with both threads


# what trains on top of the foundations: name -> (module, keyword arguments of its train(args, ...))
SYSTEMS = {"nextgpt": ("minignext.toy.train_nextgpt", {}),
           "smol": ("minignext.toy.train_nextgpt", {"recipe": "smol"}),
           "llava": ("minignext.toy.train_llava", {}), "pandagpt": ("minignext.toy.train_pandagpt", {}),
           "minigpt4": ("minignext.toy.train_minigpt4", {}),
           "minigpt4-1q": ("minignext.toy.train_minigpt4", {"queries": 1}),
           "minigpt4-4q": ("minignext.toy.train_minigpt4", {"queries": 4}),
           "flamingo": ("minignext.toy.train_flamingo", {}),
           "anygpt": ("minignext.toy.train_anygpt", {})}


def run_parts(parts, args: RunArgs):
    summary = {}
    for part in parts:
        t0 = time.perf_counter()
        module, kwargs = SYSTEMS.get(part, (f"minignext.toy.train_{part}", {}))
        result = importlib.import_module(module).train(args, **kwargs)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        summary[part] = result
        if args.main:
            print(f"{part}: {json.dumps(result)}", flush=True)
    return summary


def last_status(log_path) -> str:
    """The latest progress-bar state (or line) a lane wrote to its log."""
    try:
        tail = log_path.read_bytes()[-400:].decode(errors="replace")
    except FileNotFoundError:
        return "starting"
    pieces = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
    return pieces[-1][:70] if pieces else "starting"


def run_phases(parts, args: RunArgs, threads=2):
    """Train `parts` phase by phase, the lanes of a phase in parallel (see the module docstring)."""
    summary = {}
    for phase in PHASES:
        lanes = [[p for p in lane if p in parts] for lane in phase]
        lanes = [lane for lane in lanes if lane]
        if lanes:
            summary.update(run_lanes(lanes, args, max(1, threads // len(lanes))))
    return summary


def lane_command(lane, args: RunArgs, threads) -> list[str]:
    """The command that trains one lane (a list of parts) in a process of its own, with the same RunArgs."""
    return [sys.executable, "-m", "minignext.toy.train", "foundations", "--only", ",".join(lane), "--lanes", "1",
            "--threads", str(threads), "--seed", str(args.seed), "--scale", repr(args.scale),
            "--runs-dir", str(args.runs_dir)] + ([] if args.resume else ["--fresh"]) + (
            ["--stop-after", str(args.stop_after)] if args.stop_after else [])


def run_lanes(lanes, args: RunArgs, threads):
    """Train each lane in its own process (progress bars go to its log); returns the parts' summaries."""
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for lane in lanes:
        log = args.runs_dir / f"lane-{lane[0]}.log"
        with open(log, "w") as out:             # the child keeps its own copy of the handle
            procs.append((lane, log, subprocess.Popen(lane_command(lane, args, threads), stdout=out,
                                                      stderr=subprocess.STDOUT)))
    t0 = time.perf_counter()
    while any(p.poll() is None for _, _, p in procs):
        status = " | ".join(last_status(log) if p.poll() is None else f"{lane[-1]} done" for lane, log, p in procs)
        sys.stderr.write(f"\r[{(time.perf_counter() - t0) / 60:.1f} min] {status}"[:200].ljust(200))
        sys.stderr.flush()
        time.sleep(1.0)
    sys.stderr.write("\n")
    summary = {}
    for lane, log, p in procs:
        lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        for line in lines:
            part, _, rest = line.partition(": ")
            if part in lane and rest.startswith("{"):
                summary[part] = json.loads(rest)
                print(line)
        if p.returncode != 0:
            raise SystemExit(f"lane {' -> '.join(lane)} failed (exit {p.returncode}); its log: {log}\n"
                             + "\n".join(lines[-15:]))
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minignext.toy.train", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("foundations", *SYSTEMS))
    p.add_argument("--only", help="comma-separated parts of the foundations: " + ",".join(FOUNDATIONS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the full schedule")
    p.add_argument("--fresh", action="store_true", help="ignore saved run state and start over")
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="run state and loss logs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lanes", type=int, default=2, choices=(1, 2),
                   help="foundations: train in this many parallel processes of one thread each")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the LLM runs (FSDP) instead of DDP")
    p.add_argument("--stop-after", type=int, help="stop each run after this many of its steps, resumably")
    return p


def run_args(ns: argparse.Namespace) -> RunArgs:
    """This process's RunArgs: the options, and its rank under torchrun."""
    return RunArgs.from_env(seed=ns.seed, scale=ns.scale, resume=not ns.fresh, runs_dir=ns.runs_dir,
                            fsdp=ns.fsdp, stop_after=ns.stop_after)


def main(argv=None):
    p = parser()
    ns = p.parse_args(argv)
    try:
        args = run_args(ns)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(ns.threads)
    if ns.what == "foundations":
        parts = ns.only.split(",") if ns.only else FOUNDATIONS
        unknown = set(parts) - set(FOUNDATIONS)
        if unknown:
            p.error(f"unknown parts {sorted(unknown)}; choose from {FOUNDATIONS}")
    else:
        parts = [ns.what]
    t0 = time.perf_counter()
    if ns.what == "foundations" and ns.lanes > 1 and len(parts) > 1 and args.world_size == 1:
        summary = run_phases(parts, args, ns.threads)
    else:
        summary = launched(args, run_parts, parts, args)
    if summary is not None and args.main:
        print(f"trained {', '.join(parts)} in {(time.perf_counter() - t0) / 60:.1f} min; weights in {TOY_DIR}")
    return summary


if __name__ == "__main__":
    main()
