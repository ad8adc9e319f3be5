"""Lesson 7 exercises: the two losses that train the toy foundations, then a training loop.

Solve these before you read minignext/toy/train_imagebind.py and latent_diffusion.py; then
compare. Each function raises NotImplementedError with a first hint; more hints, each closer to
code, are in HINTS at the bottom of this file. Look at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson07_toy.py --exercises=mine
"""

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401


def info_nce(media_emb, text_emb, labels, scale):
    """Symmetric InfoNCE over a batch of N (media, text) pairs, as ImageBind binds modalities.

    media_emb, text_emb: (N, D), L2-normalised. labels: (N,) class ids; every pair whose labels are
    equal counts as a positive (several captions can describe the same object). scale: the logit scale.
    Return the mean of the media->text and text->media cross-entropies (a scalar)."""
    raise _stuck("info_nce")


def diffusion_loss(unet_fn, scheduler, latents, cond, generator):
    """One DDPM training step's loss (Ho et al. 2020, Algorithm 1).

    Draw t ~ U{0..T-1} for each latent (torch.randint(0, len(scheduler), (B,), generator=generator)), then
    noise ~ N(0, I) of the latents' shape with the same generator, in that order. Noise the latents to
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (scheduler.add_noise(latents, noise, t) does it), and
    return the mean squared error between unet_fn(x_t, t, cond) and the noise."""
    raise _stuck("diffusion_loss")


def train_denoiser(unet_fn, parameters, scheduler, latents, cond, steps, lr, seed):
    """Train a denoiser with your diffusion_loss: Adam(parameters, lr) with its default betas, one
    torch.Generator seeded with `seed` for all random draws, `steps` steps on the same latents and
    cond. Return the list of the `steps` losses (floats), each taken before its update."""
    raise _stuck("train_denoiser")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "info_nce": [
        "Score every media item against every caption (a similarity matrix times the scale). Each "
        "row is a classification: which captions belong to this item? With several right answers "
        "per row, the target is spread evenly over them. Do it for rows and for columns and average.",
        "The positives of row i are the columns j with the same label: a boolean (N, N) matrix from "
        "comparing labels with itself, turned to floats and divided by its row sums. Cross-entropy "
        "accepts such probability targets. The matrix is symmetric, so the text->media side uses the "
        "transposed logits with the same targets.",
        "logits = scale * media_emb @ text_emb.T; same = (labels[:, None] == labels[None]).float(); "
        "target = same / same.sum(1, keepdim=True); return (F.cross_entropy(logits, target) + "
        "F.cross_entropy(logits.T, target)) / 2",
    ],
    "diffusion_loss": [
        "Pick a random noise level for each latent, noise the latents to that level, and ask the "
        "model to predict the noise that was added. The loss is how far its prediction is from the "
        "true noise.",
        "Both random draws use the given generator, the time steps first. The noising formula is "
        "the scheduler's add_noise. The loss is the mean of the squared differences over all "
        "elements.",
        "t = torch.randint(0, len(scheduler), (B,), generator=generator); noise = torch.randn("
        "latents.shape, generator=generator); x_t = scheduler.add_noise(latents, noise, t); return "
        "F.mse_loss(unet_fn(x_t, t, cond), noise)",
    ],
    "train_denoiser": [
        "The usual training loop: compute the loss, clear old gradients, backpropagate, update, and "
        "remember the loss. One generator serves every step, so each step draws new time steps and "
        "noise.",
        "Create the generator and the optimizer once, before the loop. Record loss.item() so that "
        "the list holds plain floats, not tensors that keep their graphs alive.",
        "g = torch.Generator().manual_seed(seed); opt = torch.optim.Adam(parameters, lr=lr); for _ in "
        "range(steps): loss = diffusion_loss(unet_fn, scheduler, latents, cond, g); opt.zero_grad(); "
        "loss.backward(); opt.step(); losses.append(loss.item())",
    ],
}
