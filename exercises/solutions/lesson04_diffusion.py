"""Lesson 4 solutions, written out. The library's versions: `timestep_embedding` in
minignext/unet.py, `q_sample` and DDIMScheduler.step (with `ddim_update`) in
minignext/schedulers.py, `classifier_free_guidance` and `denoise` in minignext/diffusion.py."""

import math

import torch
import torch.nn.functional as F


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    angles = t[:, None].float() * freqs[None, :]                 # (B, half): outer product
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, dim % 2))


def add_noise(x0, noise, alpha_bar):
    a = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    if a.dim():                                       # one alpha_bar per sample: broadcast over (C, H, W)
        a = a.reshape(-1, *[1] * (x0.dim() - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_step(eps, x_t, alpha_bar_t, alpha_bar_prev):
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5          # the forward formula inverted
    return alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps     # ... and applied at a_prev


def classifier_free_guidance(uncond, cond, guidance_scale):
    return uncond + guidance_scale * (cond - uncond)


def ddim_sample(eps_fn, latents, alphas_cumprod, timesteps, cond, uncond, guidance_scale, final_alpha_bar):
    x = latents
    for i, t in enumerate(timesteps):
        t = int(t)
        # both branches in one batch, as the pipelines run them
        e_uncond, e_cond = eps_fn(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
        eps = classifier_free_guidance(e_uncond, e_cond, guidance_scale)
        prev = alphas_cumprod[int(timesteps[i + 1])] if i + 1 < len(timesteps) else final_alpha_bar
        x = ddim_step(eps, x, alphas_cumprod[t], prev)
    return x
