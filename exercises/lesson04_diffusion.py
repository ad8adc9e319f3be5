"""Lesson 4 exercises: the arithmetic of latent diffusion, then a whole guided DDIM sampler.

Solve these before you read minignext/schedulers.py and minignext/diffusion.py; then compare.
Each function raises NotImplementedError with a first hint; more hints, each closer to code, are
in HINTS at the bottom of this file. Look at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson04_diffusion.py --exercises=mine
"""

import math  # noqa: F401

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0):
    """Sinusoidal features (B, dim) of time steps t (B,), as the UNet's `time_proj` computes them.

    With half = dim // 2, frequency i is 10000 ** (-i / (half - freq_shift)), i = 0..half-1. The
    features are [sin(t f), cos(t f)], or [cos(t f), sin(t f)] when flip_sin_to_cos; an odd dim gets
    one zero column at the end."""
    raise _stuck("timestep_embedding")


def add_noise(x0, noise, alpha_bar):
    """The forward process in one shot (DDPM eq. 4): x_t from a clean x0 (B, ...), Gaussian noise of
    the same shape and alpha_bar_t = prod(1 - beta_s), a number or a (B,) tensor."""
    raise _stuck("add_noise")


def ddim_step(eps, x_t, alpha_bar_t, alpha_bar_prev):
    """One deterministic DDIM step (Song et al. eq. 12, sigma = 0) for a model that predicts the noise
    eps: return x_{t-1}. alpha_bar_t and alpha_bar_prev are numbers or 0-d tensors."""
    raise _stuck("ddim_step")


def classifier_free_guidance(uncond, cond, guidance_scale):
    """Combine the unconditional and the conditional noise predictions (Ho & Salimans 2022, eq. 6),
    with guidance_scale = 1 giving `cond` and 0 giving `uncond` (diffusers' convention)."""
    raise _stuck("classifier_free_guidance")


def ddim_sample(eps_fn, latents, alphas_cumprod, timesteps, cond, uncond, guidance_scale, final_alpha_bar):
    """A whole guided DDIM sampler from your ddim_step and classifier_free_guidance.

    eps_fn(x, t, context) -> the predicted noise for latents x (B, ...) at the integer step t with
    the conditioning `context` (B, ...). Start from `latents` (pure noise) and visit `timesteps`
    (descending ints). At each t predict the noise with `uncond` and with `cond`, guide, and take a
    DDIM step to the next visited step: alpha_bar of timesteps[i + 1], or `final_alpha_bar` after
    the last one. alphas_cumprod (1000,) holds alpha_bar for every t. Return the final latents."""
    raise _stuck("ddim_sample")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "timestep_embedding": [
        "Like a transformer's position encoding, with the time step as the position: every feature "
        "pair is a sine and a cosine of t at its own frequency, from fast (1 per step) to slow. "
        "The frequencies fall geometrically.",
        "Frequency i is exp(-ln(10000) i / (half - freq_shift)). Multiply the (B,) steps by the "
        "(half,) frequencies as an outer product to get (B, half) angles; concatenate their sines "
        "and cosines along the last dim in the order asked, and pad one zero column when dim is odd.",
        "freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - freq_shift)); angles = "
        "t[:, None].float() * freqs[None]; emb = torch.cat([angles.sin(), angles.cos()], -1) (cos "
        "first if flip_sin_to_cos); return F.pad(emb, (0, dim % 2))",
    ],
    "add_noise": [
        "Noising in one jump mixes the clean sample and the noise: the clean part shrinks with the "
        "square root of alpha_bar and the noise grows with the square root of one minus it, so that "
        "the variance stays one.",
        "When alpha_bar is one number per sample, give it as many trailing singleton dims as x0 has "
        "dims after the batch, so that it broadcasts. A plain number broadcasts by itself.",
        "a = torch.as_tensor(alpha_bar, dtype=x0.dtype); a = a.reshape(-1, *[1] * (x0.dim() - 1)) if "
        "a.dim() else a; return a.sqrt() * x0 + (1 - a).sqrt() * noise",
    ],
    "ddim_step": [
        "Two moves. First use the predicted noise to estimate the clean sample: invert the "
        "forward-process formula. Then noise that estimate again, to the previous (less noisy) "
        "level, with the same noise prediction.",
        "From x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t). The "
        "step's result is the forward formula at a_prev, with that x0 and that eps.",
        "x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5; return alpha_bar_prev ** 0.5 * "
        "x0 + (1 - alpha_bar_prev) ** 0.5 * eps",
    ],
    "classifier_free_guidance": [
        "Start from the unconditional prediction and move towards the conditional one, by "
        "guidance_scale times the distance between them; scales above 1 go past it.",
        "The difference (cond - uncond) is the direction the condition adds; scale it and add it "
        "to uncond.",
        "return uncond + guidance_scale * (cond - uncond)",
    ],
    "ddim_sample": [
        "A loop over the time steps. At each one, ask the model twice (without and with the "
        "condition), combine the two answers with guidance, and step the latents to the next "
        "visited noise level. The last step lands on the final level.",
        "alphas_cumprod[t] gives alpha_bar at t. The previous level of step i is the level of "
        "timesteps[i + 1], or final_alpha_bar at the end. The two model calls may be one batch "
        "(torch.cat the latents twice and the contexts uncond then cond, then .chunk(2)).",
        "x = latents; for i, t in enumerate(timesteps): e_u, e_c = eps_fn(torch.cat([x, x]), t, "
        "torch.cat([uncond, cond])).chunk(2); eps = classifier_free_guidance(e_u, e_c, guidance_scale); "
        "prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else final_alpha_bar; x = "
        "ddim_step(eps, x, alphas_cumprod[t], prev); return x",
    ],
}
