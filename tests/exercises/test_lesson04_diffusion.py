import pytest
import torch
from torch.testing import assert_close

from conftest import check

LESSON = "lesson04_diffusion"

diffusers = pytest.importorskip("diffusers")
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            steps_offset=1, set_alpha_to_one=False, clip_sample=False)
NO_SQRT = "the signal and the noise must be scaled by the square roots of alpha_bar and 1 - alpha_bar"
AWAY = "the guidance points away from the condition: it must start at uncond and move towards cond"


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (32, False, 1), (7, True, 0)])
def test_timestep_embedding_matches_diffusers(ex, dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 250, 999])
    want = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    check(ex.timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift), want,
          f"timestep_embedding(dim={dim}, flip_sin_to_cos={flip}, freq_shift={shift}) vs diffusers' "
          f"get_timestep_embedding", atol=1e-5, rtol=1e-5)


def test_add_noise_matches_diffusers(ex):
    sched = diffusers.DDPMScheduler.from_config(SD15)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 400, 999])
    want = sched.add_noise(x0, noise, t)
    abar = sched.alphas_cumprod[t].view(3, 1, 1, 1)
    check(ex.add_noise(x0, noise, sched.alphas_cumprod[t]), want, "add_noise vs diffusers' DDPMScheduler.add_noise",
          wrong=[(NO_SQRT, abar * x0 + (1 - abar) * noise)], atol=1e-6, rtol=1e-5)
    check(ex.add_noise(x0, noise, 1.0), x0, "add_noise with alpha_bar = 1 (no noise at all)")


def test_ddim_step_matches_diffusers(ex):
    sched = diffusers.DDIMScheduler(**SD15)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g)
    for t in sched.timesteps[:-1]:
        eps = torch.randn(2, 4, 6, 6, generator=g)
        want = sched.step(eps, t, x).prev_sample
        got = ex.ddim_step(eps, x, sched.alphas_cumprod[t], sched.alphas_cumprod[t - 100])
        check(got, want, f"ddim_step at t={int(t)} vs diffusers' DDIMScheduler.step", atol=1e-5, rtol=1e-5)
        x = want


def test_classifier_free_guidance(ex):
    g = torch.Generator().manual_seed(2)
    u, c = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for w in (0.0, 1.0, 7.5):
        check(ex.classifier_free_guidance(u, c, w), (1 - w) * u + w * c, f"guidance at scale {w}",
              wrong=[(AWAY, u + w * (u - c))], atol=1e-5, rtol=1e-5)
    assert_close(ex.classifier_free_guidance(u, c, 1.0), c)


def test_ddim_sample_equals_the_library_sampler(ex):
    from minignext.diffusion import denoise
    from minignext.schedulers import DDIMScheduler

    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 4, generator=g) * 0.3

    def eps_fn(x, t, context):          # a toy noise predictor that depends on t and the context
        return torch.einsum("bchw,cd->bdhw", x, weight) * (t / 1000) + context[:, :, None, None]

    scheduler = DDIMScheduler.from_config(SD15)
    latents = torch.randn(2, 4, 5, 5, generator=g)
    cond, uncond = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    want = denoise(eps_fn, latents, scheduler, cond, uncond, guidance_scale=4.0, num_inference_steps=8,
                   progress=False)
    got = ex.ddim_sample(eps_fn, latents, scheduler.alphas_cumprod, scheduler.timesteps.tolist(), cond, uncond, 4.0,
                         scheduler.final_alpha_cumprod)
    check(got, want, "ddim_sample (8 guided steps) vs minignext.diffusion.denoise with a DDIMScheduler",
          atol=1e-4, rtol=1e-4)
