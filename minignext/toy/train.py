"""Train the toy world's models from scratch on CPU.

    python -m minignext.toy.train foundations [--only imagebind,llm,...] [--seed 0] [--fresh]
    python -m minignext.toy.train nextgpt [--fresh]

Each part lives in its own module, `minignext.toy.train_<part>`, with
`train(seed=0, resume=True, progress=True, scale=1.0) -> dict` (scale < 1 shortens the schedule, for the
notebooks) that saves the part's finished weights under weights/toy/ and returns a summary.
"""

import argparse
import importlib
import json
import time

import torch

from minignext.toy.trainer import TOY_DIR

FOUNDATIONS = ("imagebind", "llm", "image_decoder", "audio_decoder", "video_decoder")


def run_parts(parts, seed, resume, scale):
    summary = {}
    for part in parts:
        t0 = time.perf_counter()
        result = importlib.import_module(f"minignext.toy.train_{part}").train(
            seed=seed, resume=resume, scale=scale)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        summary[part] = result
        print(f"{part}: {json.dumps(result)}")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minignext.toy.train", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("foundations", "nextgpt"))
    p.add_argument("--only", help="comma-separated parts of the foundations: " + ",".join(FOUNDATIONS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore saved run state and start over")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the full schedule")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "foundations":
        parts = args.only.split(",") if args.only else FOUNDATIONS
        unknown = set(parts) - set(FOUNDATIONS)
        if unknown:
            p.error(f"unknown parts {sorted(unknown)}; choose from {FOUNDATIONS}")
    else:
        parts = ["nextgpt"]
    t0 = time.perf_counter()
    summary = run_parts(parts, args.seed, not args.fresh, args.scale)
    total = time.perf_counter() - t0
    print(f"trained {', '.join(parts)} in {total / 60:.1f} min; weights in {TOY_DIR}")
    return summary


if __name__ == "__main__":
    main()
