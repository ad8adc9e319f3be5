"""Lesson 4 exercises: the arithmetic of latent diffusion.

Check your work:  python -m pytest tests/exercises/test_lesson04_diffusion.py --exercises=mine
"""

import torch


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0):
    """Sinusoidal features (B, dim) of time steps t (B,), as the UNet's `time_proj` computes them.

    With half = dim // 2, frequency i is 10000 ** (-i / (half - freq_shift)), i = 0..half-1. The
    features are [sin(t f), cos(t f)], or [cos(t f), sin(t f)] when flip_sin_to_cos; an odd dim gets
    one zero column at the end."""
    raise NotImplementedError(
        "freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - freq_shift)); "
        "angles = t[:, None].float() * freqs[None]; concatenate sin and cos of the angles along the last "
        "dim (cos first if flip_sin_to_cos), then F.pad(emb, (0, dim % 2)).")


def add_noise(x0, noise, alpha_bar):
    """The forward process in one shot (DDPM eq. 4): x_t from a clean x0 (B, ...), Gaussian noise of
    the same shape and alpha_bar_t = prod(1 - beta_s), a number or a (B,) tensor."""
    raise NotImplementedError(
        "x_t = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise. For a (B,) alpha_bar, reshape it to "
        "(B, 1, 1, 1) so that it broadcasts over the other dims of x0.")


def ddim_step(eps, x_t, alpha_bar_t, alpha_bar_prev):
    """One deterministic DDIM step (Song et al. eq. 12, sigma = 0) for a model that predicts the noise
    eps: return x_{t-1}. alpha_bar_t and alpha_bar_prev are numbers or 0-d tensors."""
    raise NotImplementedError(
        "First predict the clean sample: x0 = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t). "
        "Then re-noise it to the previous level with the same eps: "
        "sqrt(alpha_bar_prev) * x0 + sqrt(1 - alpha_bar_prev) * eps.")


def classifier_free_guidance(uncond, cond, guidance_scale):
    """Combine the unconditional and the conditional noise predictions (Ho & Salimans 2022, eq. 6),
    with guidance_scale = 1 giving `cond` and 0 giving `uncond` (diffusers' convention)."""
    raise NotImplementedError(
        "Start from the unconditional prediction and move guidance_scale times the difference "
        "(cond - uncond) towards the conditional one; scales above 1 extrapolate past cond.")
