"""Training jobs that tests/test_distributed.py starts under torchrun (python -m torch.distributed.run):

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_driver.py OUT DATA JOB[,JOB...]
        [--stop-after N]

    llm        the toy LLaMA's own training loop (minignext.toy.train_llm) for 2 steps
    nextgpt    NExT-GPT's three stages on the tiny-random preset and the synthetic data in DATA, 3 steps each
    reduce     RunArgs.mean and RunArgs.gather on shares, and the same on the whole batch (reduce.json)
    misuse     a loss computed outside run.forward, which the step must refuse (refused.txt)

JOB+fsdp runs JOB under FSDP. Each job writes to OUT/JOB/ (its runs in runs/); one stopped by --stop-after
leaves OUT/JOB/stopped. Without torchrun the jobs run in one process. Several jobs share one launch
because starting the processes is what costs most here.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from minignext.toy import train_llm
from minignext.toy.trainer import Run, RunArgs, RunStopped, optimizer_step
from minignext.training import distributed, nextgpt

LLM_SCALE, NEXTGPT_STEPS, NEXTGPT_BATCH = 0.003, 3, 4


def llm(out, data, common):
    args = RunArgs.from_env(scale=LLM_SCALE, progress=False, runs_dir=out / "runs", **common)
    train_llm.train(args, out_dir=out / "weights")


def run_nextgpt(out, data, common):
    args = RunArgs.from_env(progress=False, runs_dir=out / "runs", **common)
    nextgpt.train(args, "tiny-random", data, out, steps=NEXTGPT_STEPS, batch=NEXTGPT_BATCH)


def reduce(out, data, common):
    """Token counts that differ between the shares, and a contrastive loss over the gathered batch."""
    from minignext.toy.train_imagebind import info_nce

    args = RunArgs.from_env(progress=False, **common)
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x, y = torch.randn(7, 4), torch.randn(7, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    count = torch.tensor([3.0, 1, 4, 1, 5, 9, 2])

    def losses(xs, ys, counts, gather, mean):
        e = xs @ w
        return mean((e * e).sum(1).mul(counts).sum(), counts.sum()) + info_nce(gather(e), gather(ys), labels, 2.0)

    whole = losses(x, y, count, lambda t: t, lambda total, n: total / n)
    (want,) = torch.autograd.grad(whole, w)
    mine = losses(args.shard(x), args.shard(y), args.shard(count), args.gather, args.mean)
    (got,) = torch.autograd.grad(mine, w)
    got = distributed.all_sum(got) / args.world_size          # what DDP does to the ranks' gradients
    value = distributed.average([mine.item()])[0]
    if args.main:
        (out / "reduce.json").write_text(json.dumps({"loss": value, "want": whole.item(), "grad": got.tolist(),
                                                     "want_grad": want.tolist()}))


def misuse(out, data, common):
    """A loss computed outside run.forward: DDP never combines those gradients, so the step refuses."""
    args = RunArgs.from_env(progress=False, runs_dir=out / "runs", **common)
    layer = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    run = Run.start("misuse", args, {"layer": layer}, opt, 2, 0.1, warmup=1)
    try:
        for _ in run.steps():
            optimizer_step(opt, layer(torch.ones(1, 2)).sum(), layer.parameters())
    except RuntimeError as e:
        if args.main:
            (out / "refused.txt").write_text(str(e))


JOBS = {"llm": llm, "nextgpt": run_nextgpt, "reduce": reduce, "misuse": misuse}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("jobs")
    p.add_argument("--stop-after", type=int)
    ns = p.parse_args()
    torch.set_num_threads(1)
    distributed.setup()
    try:
        for job in ns.jobs.split(","):
            name, _, mode = job.partition("+")
            out = ns.out / job
            out.mkdir(parents=True, exist_ok=True)
            try:
                JOBS[name](out, ns.data, {"fsdp": mode == "fsdp", "stop_after": ns.stop_after})
            except RunStopped:
                if distributed.environment()[0] == 0:
                    (out / "stopped").write_text("stopped\n")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
