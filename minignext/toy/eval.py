"""Measure the shipped toy models on held-out prompts, judged by the analytic checkers.

    python -m minignext.toy.eval foundations [--only ...] [--quick]
    python -m minignext.toy.eval nextgpt [--quick]
    python -m minignext.toy.eval anygpt [--quick]      (the toy AnyGPT's row of the family table)
    python -m minignext.toy.eval flamingo [--quick]
    python -m minignext.toy.eval users [--preset toy] [--quick]   (a user's own words: eval_users)

Each foundation's module `minignext.toy.train_<part>` has `evaluate(quick=False, seed=1234) -> list[Metric]`;
the toy NExT-GPT's is `minignext.toy.eval_nextgpt`, which drives `NextGPT.chat` like every user does.
The command prints one table and exits non-zero if any metric misses its threshold. With --quick it is
a smoke check, not a gate: a few samples per row, where one unlucky sample moves a row by a sixth, so
misses are reported and the exit code is 0 (unless a part fails to run at all).
"""

import argparse
import importlib
import sys
import time
from dataclasses import dataclass

import torch

from minignext.toy.train import FOUNDATIONS

EVALUATORS = {"nextgpt": "minignext.toy.eval_nextgpt",      # part -> module; default minignext.toy.train_<part>
              "flamingo": "minignext.toy.eval_flamingo",
              "users": "minignext.toy.eval_users", "family": "minignext.toy.family",
              "anygpt": "minignext.toy.eval_anygpt"}


@dataclass
class Metric:
    name: str
    value: float                 # a fraction in [0, 1], or any number when threshold is None
    threshold: float | None = None
    n: int = 0
    note: str = ""

    @property
    def ok(self):
        return self.threshold is None or self.value >= self.threshold


def format_table(metrics) -> str:
    rows = ["| what is measured | value | threshold | n | ok |", "| --- | --- | --- | --- | --- |"]
    for m in metrics:
        value = f"{100 * m.value:.1f}%" if m.threshold is not None or 0 <= m.value <= 1 else f"{m.value:.3g}"
        thr = f">= {100 * m.threshold:.0f}%" if m.threshold is not None else "(reported)"
        note = f" ({m.note})" if m.note else ""
        rows.append(f"| {m.name}{note} | {value} | {thr} | {m.n} | {'yes' if m.ok else 'NO'} |")
    return "\n".join(rows)


def parts_of(what, only=None) -> list[str]:
    if what in EVALUATORS:
        return [what]
    return only.split(",") if only else list(FOUNDATIONS)


def evaluate(parts, quick=False, **kwargs):
    metrics = []
    for part in parts:
        t0 = time.perf_counter()
        module = importlib.import_module(EVALUATORS.get(part, f"minignext.toy.train_{part}"))
        metrics += module.evaluate(quick=quick, **kwargs)
        print(f"{part}: evaluated in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minignext.toy.eval", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("foundations", *EVALUATORS))
    p.add_argument("--only", help="comma-separated parts: " + ",".join(FOUNDATIONS))
    p.add_argument("--quick", action="store_true", help="a smoke check on a few samples: misses are reported, not failed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default=None, help="users: the preset whose chat is judged (default: toy)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = parts_of(args.what, args.only)
    metrics = evaluate(parts, quick=args.quick, **({"preset": args.preset} if args.preset else {}))
    print(format_table(metrics))
    failed = [m.name for m in metrics if not m.ok]
    if failed and args.quick:
        print(f"below threshold on the quick sample (not a gate; run without --quick to measure): "
              f"{', '.join(failed)}", file=sys.stderr)
    elif failed:
        print(f"below threshold: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    return metrics


if __name__ == "__main__":
    main()
