"""The toy training kit: run arguments, the naming rule that keeps seeds and scales apart, named random
streams, the warmup rule, and the CLI that builds the arguments."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minignext.toy import train
from minignext.toy import train_image_decoder as image_decoder
from minignext.toy.trainer import RUNS_DIR, Run, RunArgs, read_loss_log, warmup_steps


def test_run_names_carry_part_seed_and_scale():
    assert RunArgs().name("image_decoder_unet") == "image_decoder_unet-seed0-scale1"
    assert RunArgs(seed=3, scale=0.002).name("llm") == "llm-seed3-scale0.002"
    assert RunArgs().runs_dir == RUNS_DIR


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=1.5), dict(seed=True), dict(scale=0), dict(scale=-0.5)])
def test_run_args_refuse_what_no_run_can_use(bad):
    with pytest.raises(ValueError, match="seed|scale"):
        RunArgs(**bad)


def test_scaled_steps_and_data():
    args = RunArgs(scale=0.01)
    assert (args.steps(600), args.steps(100), RunArgs().steps(600)) == (6, 2, 600)
    assert (args.count(6144, least=64), args.count(1000, least=64), RunArgs().count(6144, least=64)) == (245, 64, 6144)


def test_warmup_is_a_tenth_and_one_step_at_most_the_cap():
    assert [warmup_steps(total, 50) for total in (2, 9, 10, 250, 600, 2800)] == [1, 1, 2, 26, 50, 50]


def test_named_streams_are_stable_distinct_and_keyed():
    a, b = RunArgs(seed=0), RunArgs(seed=1)
    assert np.array_equal(a.rng("llm/batches", 3).integers(1 << 30, size=4), a.rng("llm/batches", 3).integers(1 << 30, size=4))
    draws = {(args.seed, name, key): args.rng(name, key).integers(1 << 30)
             for args in (a, b) for name in ("llm/batches", "imagebind/batches") for key in (0, 1)}
    assert len(set(draws.values())) == len(draws)
    noise = torch.randn(3, generator=a.generator("x", 5))
    assert torch.equal(noise, torch.randn(3, generator=a.generator("x", 5)))
    assert not torch.equal(noise, torch.randn(3, generator=a.generator("x", 6)))
    # crc32 and SeedSequence give every process the same number: the streams of retrained parts hold still
    assert a.seed_of("image_decoder_unet/latents", 7) == 1657257801395817934


def test_run_start_names_the_run_and_resumes_only_that_name(tmp_path):
    def start(seed):
        layer = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        args = RunArgs(seed=seed, scale=0.5, progress=False, runs_dir=tmp_path)
        run = Run.start("tiny", args, {"layer": layer}, opt, 8, 0.1, warmup=50)
        for _ in run.steps():
            opt.zero_grad()
            loss = layer(torch.ones(1, 2)).pow(2).sum()
            loss.backward()
            opt.step()
            run.log(loss.detach())
        return run

    first = start(0)
    assert (first.name, first.total, first.warmup) == ("tiny-seed0-scale0.5", 4, 1)
    assert len(read_loss_log("tiny-seed0-scale0.5", runs_dir=tmp_path)) == 4
    again = start(0)                                    # the same name: finished, nothing left to train
    assert len(again.history) == 4 and again.step == 4
    other = start(1)                                    # another name: trains from its own start
    assert other.name == "tiny-seed1-scale0.5" and [r["step"] for r in other.history] == [0, 1, 2, 3]


def test_a_second_seed_trains_its_own_steps_and_ships_other_weights(tmp_path):
    """Runs were once named without seed or scale, so a seed-1 run resumed seed 0's finished run,
    trained 0 steps and shipped seed 0's weights."""
    unets = {}
    for seed in (0, 1):
        args = RunArgs(seed=seed, scale=0.001, progress=False, runs_dir=tmp_path / "runs")
        summary = image_decoder.train(args, out_dir=tmp_path / f"seed{seed}")
        assert summary["unet"]["steps"] > 0
        for run in ("image_decoder_vae", "image_decoder_vae_edges", "image_decoder_unet"):
            assert len(read_loss_log(args.name(run), runs_dir=args.runs_dir)) > 0, (seed, run)
        unets[seed] = load_file(tmp_path / f"seed{seed}" / "unet" / "diffusion_pytorch_model.safetensors")
    assert unets[0].keys() == unets[1].keys()
    assert all(not torch.equal(unets[0][k], unets[1][k]) for k in unets[0] if unets[0][k].dim() >= 2)


def test_the_command_line_builds_the_run_args_and_passes_them_to_its_lanes(tmp_path):
    ns = train.parser().parse_args(["foundations", "--seed", "2", "--scale", "0.005", "--fresh",
                                    "--runs-dir", str(tmp_path)])
    args = train.run_args(ns)
    assert args == RunArgs(seed=2, scale=0.005, resume=False, progress=True, runs_dir=tmp_path)
    cmd = train.lane_command(["imagebind", "llm"], args, threads=1)
    assert cmd[1:3] == ["-m", "minignext.toy.train"]
    lane = train.parser().parse_args(cmd[3:])
    assert train.run_args(lane) == args and lane.only == "imagebind,llm" and lane.lanes == 1
    assert train.run_args(train.parser().parse_args(["nextgpt"])) == RunArgs()
    with pytest.raises(SystemExit):
        train.main(["nextgpt", "--seed", "-1"])


def test_freed_memory_is_kept_where_the_c_library_is_glibc():
    """keep_freed_memory sets glibc's malloc thresholds (and says so), and elsewhere does nothing."""
    import platform
    import sys

    from minignext.toy.trainer import keep_freed_memory

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    x = torch.randn(4096, 4096)         # 64 MB, freed and taken again: the allocator still works
    del x
    assert torch.ones(4096, 4096).sum().item() == 4096 * 4096
