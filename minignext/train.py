"""Train NExT-GPT at real size, on one process or many (minignext.training.nextgpt), and what goes with it.

    python -m minignext.train nextgpt --preset nextgpt-7b --data DIR --out OUT [--last-stage 3] [--fsdp]
    torchrun --nproc_per_node 8 -m minignext.train nextgpt --preset nextgpt-7b --data DIR --out OUT \\
        --device cuda --dtype bfloat16
    python -m minignext.train synthetic DIR        # a tiny data set in the reference's formats
    python -m minignext.train memory               # memory per GPU of each way to train nextgpt-7b

Under torchrun every process runs the same command; only rank 0 prints and writes. A run that stops
(--stop-after, or a crash) resumes from its checkpoints under OUT/runs/ when started again.
"""

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minignext.train", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("nextgpt", help="NExT-GPT's three stages on the reference's data formats")
    n.add_argument("--preset", default="nextgpt-7b", choices=("nextgpt-7b", "tiny-random"))
    n.add_argument("--data", type=Path, required=True, help="T_X_pair_data/, IT_data/MosIT_data/, embed/")
    n.add_argument("--out", type=Path, required=True, help="where nextgpt.json, delta.safetensors and runs/ go")
    n.add_argument("--last-stage", type=int, default=3, choices=(1, 2, 3),
                   help="train stages 1 to this one (finished stages are skipped when the command runs again)")
    n.add_argument("--fsdp", action="store_true", help="shard the model (FSDP) instead of copying it (DDP)")
    n.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    n.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    n.add_argument("--batch", type=int, default=8, help="dialogues per step, over all processes")
    n.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    n.add_argument("--epochs", type=float, default=1.0)
    n.add_argument("--steps", type=int, help="steps per stage (instead of --epochs)")
    n.add_argument("--max-tokens", type=int, default=512)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--fresh", action="store_true", help="ignore saved run state and start over")
    n.add_argument("--stop-after", type=int, help="stop each stage after this many steps, resumably")
    n.add_argument("--save-every", type=int, help="checkpoint every this many steps (default 200)")
    n.add_argument("--threads", type=int, help="torch threads per process")
    s = sub.add_parser("synthetic", help="write a tiny data set in the reference's formats")
    s.add_argument("dir", type=Path)
    s.add_argument("--n", type=int, default=6, help="pairs per modality and dialogues")
    s.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("memory", help="memory per GPU of DDP + LoRA, FSDP and ZeRO-2 for nextgpt-7b (bf16)")
    m.add_argument("--gpus", default="1,2,4,8")
    m.add_argument("--tokens", type=int, default=512, help="tokens per sequence for the activation estimate")
    return p


def run_nextgpt(p, ns):
    from minignext.toy.trainer import RunArgs, launched
    from minignext.training import nextgpt

    if ns.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
    try:
        args = RunArgs.from_env(seed=ns.seed, resume=not ns.fresh, runs_dir=ns.out / "runs", fsdp=ns.fsdp,
                                device=ns.device, stop_after=ns.stop_after, save_every=ns.save_every)
    except ValueError as e:
        p.error(str(e))
    if ns.threads:
        torch.set_num_threads(ns.threads)
    report = launched(args, nextgpt.train, args, ns.preset, ns.data, ns.out, ns.last_stage, batch=ns.batch, lr=ns.lr,
                      epochs=ns.epochs, steps=ns.steps, dtype=DTYPES[ns.dtype], max_tokens=ns.max_tokens)
    if report is not None and args.main:
        print(json.dumps(report, indent=1))
    return report


def main(argv=None):
    p = parser()
    ns = p.parse_args(argv)
    if ns.what == "nextgpt":
        return run_nextgpt(p, ns)
    if ns.what == "synthetic":
        from minignext.tiny import TINY
        from minignext.training.data import write_synthetic

        print(f"wrote {write_synthetic(ns.dir, TINY['cond'], n=ns.n, seed=ns.seed)} (conditioning shapes of "
              f"the tiny-random preset)")
        return None
    from minignext.training.memory import markdown_table

    print(markdown_table(tuple(int(x) for x in ns.gpus.split(",")), ns.tokens))
    return None


if __name__ == "__main__":
    main()
