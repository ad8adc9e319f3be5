"""Training under torchrun: two CPU processes (gloo) that each train on their share of every global batch
end where one process ends on the whole batch, under DDP and under FSDP; a stopped two-process run
resumes to the uninterrupted result; NExT-GPT's real-size path runs its three stages on the tiny-random
preset and a synthetic data set in the reference's formats. The jobs are tests/distributed_driver.py's.

Two runs that split a batch differently add the same gradients in a different order (about 1e-7 apart),
and Adam's first steps divide a gradient by its own size, so a parameter whose true gradient is zero
moves by +-lr on the rounding noise alone. The key third of every nn.MultiheadAttention in_proj_bias is
such a parameter (a bias added to every key shifts all scores of a query alike; softmax ignores it); the
output projections have them, and they are held to that bound instead.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_driver as driver
import pytest
import torch
from safetensors.torch import load_file

from minignext.systems.nextgpt_checkpoint import load_folder
from minignext.tiny import TINY
from minignext.training import data, nextgpt

DRIVER = Path(driver.__file__)
ROOT = DRIVER.parent.parent
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, data_dir, jobs, stop_after=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(DRIVER), str(out), str(data_dir), jobs]
    cmd += ["--stop-after", str(stop_after)] if stop_after else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIGNEXT_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    data_dir = data.write_synthetic(tmp / "data", TINY["cond"], n=4)
    one = tmp / "one"
    for job in ("llm", "nextgpt"):            # one process, in this one (one thread, as the launches)
        (one / job).mkdir(parents=True)
        driver.JOBS[job](one / job, data_dir, {"fsdp": False, "stop_after": None})
    return {"one": one, "data": data_dir, "tmp": tmp,
            "two": launch(tmp / "two", data_dir, "reduce,misuse,llm,nextgpt,llm+fsdp,nextgpt+fsdp")}


def run_state(runs_dir) -> dict:
    """The fp32 modules of the one run in runs_dir: its state.pt, or its FSDP shards made one file."""
    (run,) = [p for p in Path(runs_dir).iterdir() if p.is_dir()]
    if (run / "state.dcp").is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(run / "state.dcp", run.parent / "state.whole.pt")
        state = torch.load(run.parent / "state.whole.pt", weights_only=True)["modules"]
        return {k.removeprefix("parts."): v for k, v in state.items()}
    state = torch.load(run / "state.pt", weights_only=True)["modules"]
    return {f"{m}.{k}": v for m, sd in state.items() for k, v in sd.items()}


def losses(runs_dir) -> dict:
    return {p.name: [json.loads(line)["loss"] for line in open(p / "loss.jsonl")]
            for p in sorted(Path(runs_dir).iterdir()) if (p / "loss.jsonl").is_file()}


def assert_same_losses(a, b):
    assert a.keys() == b.keys() and a
    for run in a:
        torch.testing.assert_close(torch.tensor(b[run]), torch.tensor(a[run]), rtol=TOL, atol=0, msg=run)


def test_shares_reduce_to_the_whole_batch(runs):
    """RunArgs.mean weights shares of different token counts; RunArgs.gather gives a contrastive loss
    the whole batch; the ranks' average gradient is the whole batch's."""
    got = json.loads((runs["two"] / "reduce" / "reduce.json").read_text())
    assert got["loss"] == pytest.approx(got["want"], rel=1e-6)
    torch.testing.assert_close(torch.tensor(got["grad"]), torch.tensor(got["want_grad"]), rtol=1e-6, atol=1e-6)


def test_a_loss_computed_outside_the_wrapper_is_refused(runs):
    """Under DDP such gradients would never be averaged: each process would drift on its own share."""
    assert "must come from run.forward" in (runs["two"] / "misuse" / "refused.txt").read_text()


@pytest.mark.parametrize("job", ["llm", "llm+fsdp"])
def test_two_processes_train_a_tiny_llama_as_one_does(runs, job):
    one, two = run_state(runs["one"] / "llm" / "runs"), run_state(runs["two"] / job / "runs")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=TOL, msg=k)
    assert_same_losses(losses(runs["one"] / "llm" / "runs"), losses(runs["two"] / job / "runs"))
    assert (runs["two"] / job / "weights" / "model.safetensors").is_file()


def key_bias(name, tensor):
    """The key third of an attention in_proj_bias (true gradient zero), as a mask."""
    mask = torch.zeros_like(tensor, dtype=torch.bool)
    if name.endswith("in_proj_bias"):
        third = tensor.shape[0] // 3
        mask[third:2 * third] = True
    return mask


@pytest.mark.parametrize("job", ["nextgpt", "nextgpt+fsdp"])
def test_two_processes_train_nextgpts_stages_as_one_does(runs, job):
    one, two = (load_file(runs[r] / j / "delta.safetensors") for r, j in (("one", "nextgpt"), ("two", job)))
    assert one.keys() == two.keys()
    steps = 3 * driver.NEXTGPT_STEPS
    for k in one:
        err, keys = (two[k] - one[k]).abs(), key_bias(k, one[k])
        assert err[~keys].max() <= TOL, (k, err[~keys].max())
        assert (err[keys] <= 2 * steps * nextgpt.PEAK_LR).all(), k
    assert_same_losses(losses(runs["one"] / "nextgpt" / "runs"), losses(runs["two"] / job / "runs"))


def test_the_real_size_path_writes_a_model_that_loads_and_answers(runs):
    out = runs["one"] / "nextgpt"
    meta = json.loads((out / "nextgpt.json").read_text())
    assert meta["lora_r"] == 32 and (out / meta["llm"] / "config.json").is_file()
    for stage in (1, 2, 3):
        assert len(losses(out / "runs")[f"nextgpt_stage{stage}-seed0-scale1"]) == driver.NEXTGPT_STEPS
    model = load_folder(out)
    delta = load_file(out / "delta.safetensors")
    torch.testing.assert_close(model.llama_proj.weight, delta["llama_proj.weight"])
    reply = model.chat("draw a red circle.", decode=False, progress=False,
                       force_response=" here it is.[IMG0][IMG1][IMG2][IMG3]")
    assert reply.conditioning[0][1].shape == (1,) + TINY["cond"]["image"]


def test_a_stopped_two_process_run_resumes_to_the_uninterrupted_result(runs):
    """Each run stops after its first step (DDP's state.pt for the toy LLaMA, FSDP's sharded state
    for NExT-GPT's stage 1); started again, they finish as the runs that never stopped."""
    out = runs["tmp"] / "resumed"
    launch(out, runs["data"], "llm,nextgpt+fsdp", stop_after=1)
    assert (out / "llm" / "stopped").is_file() and (out / "nextgpt+fsdp" / "stopped").is_file()
    assert not (out / "nextgpt+fsdp" / "delta.safetensors").exists()
    launch(out, runs["data"], "llm,nextgpt+fsdp")
    for job in ("llm", "nextgpt+fsdp"):
        assert_same_losses(losses(runs["two"] / job / "runs"), losses(out / job / "runs"))
    want, got = run_state(runs["two"] / "llm" / "runs"), run_state(out / "llm" / "runs")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7, msg=k)
    want, got = (load_file(d / "nextgpt+fsdp" / "delta.safetensors") for d in (runs["two"], out))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7, msg=k)
