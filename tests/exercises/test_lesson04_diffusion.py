import pytest
import torch
from torch.testing import assert_close

LESSON = "lesson04_diffusion"

diffusers = pytest.importorskip("diffusers")
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            steps_offset=1, set_alpha_to_one=False, clip_sample=False)


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (32, False, 1), (7, True, 0)])
def test_timestep_embedding_matches_diffusers(ex, dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 250, 999])
    want = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert_close(ex.timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift), want,
                 atol=1e-5, rtol=1e-5)


def test_add_noise_matches_diffusers(ex):
    sched = diffusers.DDPMScheduler.from_config(SD15)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 400, 999])
    want = sched.add_noise(x0, noise, t)
    assert_close(ex.add_noise(x0, noise, sched.alphas_cumprod[t]), want, atol=1e-6, rtol=1e-5)
    assert_close(ex.add_noise(x0, noise, 1.0), x0)


def test_ddim_step_matches_diffusers(ex):
    sched = diffusers.DDIMScheduler(**SD15)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g)
    for t in sched.timesteps[:-1]:
        eps = torch.randn(2, 4, 6, 6, generator=g)
        want = sched.step(eps, t, x).prev_sample
        got = ex.ddim_step(eps, x, sched.alphas_cumprod[t], sched.alphas_cumprod[t - 100])
        assert_close(got, want, atol=1e-5, rtol=1e-5)
        x = want


def test_classifier_free_guidance(ex):
    g = torch.Generator().manual_seed(2)
    u, c = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for w in (0.0, 1.0, 7.5):
        assert_close(ex.classifier_free_guidance(u, c, w), (1 - w) * u + w * c, atol=1e-5, rtol=1e-5)
    assert_close(ex.classifier_free_guidance(u, c, 1.0), c)
