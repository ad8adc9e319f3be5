"""DDPM, DDIM and Euler against diffusers: identical timesteps, step outputs <= 1e-6 (SD-1.5 betas)."""

import diffusers
import pytest
import torch
from torch.testing import assert_close

from minignext import schedulers

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
        "skip_prk_steps": True, "trained_betas": None}
NAMES = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"]


def pair(name, **overrides):
    cfg = {**SD15, **overrides}
    ref = getattr(diffusers, name).from_config(cfg)
    return ref, getattr(schedulers, name).from_config(cfg)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 50, 333])
def test_timesteps_equal(name, spacing, steps):
    ref, mine = pair(name, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    mine.set_timesteps(steps)
    assert mine.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(mine.timesteps, ref.timesteps)
    if name == "EulerDiscreteScheduler":
        assert torch.equal(mine.sigmas, ref.sigmas)
    assert_close(torch.as_tensor(mine.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma), atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_sampling_trajectory_matches(name, prediction, spacing):
    ref, mine = pair(name, prediction_type=prediction, timestep_spacing=spacing)
    ref.set_timesteps(10)
    mine.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x_ref = x_mine = torch.randn(2, 4, 8, 8, generator=g) * ref.init_noise_sigma
    for t in ref.timesteps:
        out = torch.randn(2, 4, 8, 8, generator=g)            # stands in for the UNet
        a, b = ref.scale_model_input(x_ref, t), mine.scale_model_input(x_mine, t)
        assert_close(b, a, atol=1e-6, rtol=0)
        x_ref = ref.step(out, t, x_ref, generator=torch.Generator().manual_seed(int(t))).prev_sample
        x_mine = mine.step(out, t, x_mine, generator=torch.Generator().manual_seed(int(t))).prev_sample
        assert_close(x_mine, x_ref, atol=1e-6, rtol=1e-6)


def test_clip_sample_and_set_alpha_to_one_and_zero_snr():
    zero_snr = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    for kw in [dict(clip_sample=True), dict(set_alpha_to_one=True), zero_snr]:
        for name in ("DDPMScheduler", "DDIMScheduler"):
            ref, mine = pair(name, **kw)
            ref.set_timesteps(5)
            mine.set_timesteps(5)
            x = torch.randn(1, 4, 4, 4) * 3
            for t in ref.timesteps:
                out = torch.randn(1, 4, 4, 4)
                want = ref.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
                got = mine.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
                assert_close(got, want, atol=1e-6, rtol=1e-6)
                x = want


def test_euler_karras_sigmas():
    ref, mine = pair("EulerDiscreteScheduler", use_karras_sigmas=True)
    ref.set_timesteps(12)
    mine.set_timesteps(12)
    assert_close(mine.sigmas, ref.sigmas, atol=1e-6, rtol=1e-6)
    assert_close(mine.timesteps, ref.timesteps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise(name):
    ref, mine = pair(name)
    ref.set_timesteps(20)
    mine.set_timesteps(20)
    x, n = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = ref.timesteps[[0, 7, 19]]
    assert_close(mine.add_noise(x, n, t), ref.add_noise(x, n, t), atol=1e-6, rtol=1e-6)


def test_forward_process_formula():
    s = schedulers.DDPMScheduler.from_config(SD15)
    abar = torch.cumprod(1 - (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2).double(), 0)
    assert_close(s.alphas_cumprod.double(), abar, atol=1e-6, rtol=1e-5)
    x, n = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    assert_close(s.add_noise(x, n, torch.tensor([999])), abar[999].sqrt().float() * x)


def test_bad_config():
    with pytest.raises(ValueError, match="prediction_type"):
        schedulers.DDIMScheduler.from_config({"prediction_type": "flow"})
    s = schedulers.DDIMScheduler.from_config(SD15)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(1001)
    assert isinstance(schedulers.scheduler_from_config(SD15), schedulers.DDIMScheduler)
