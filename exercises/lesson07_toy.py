"""Lesson 7 exercises: the two losses that train the toy foundations.

Check your work:  python -m pytest tests/exercises/test_lesson07_toy.py --exercises=mine
"""


def info_nce(media_emb, text_emb, labels, scale):
    """Symmetric InfoNCE over a batch of N (media, text) pairs, as ImageBind binds modalities.

    media_emb, text_emb: (N, D), L2-normalised. labels: (N,) class ids; every pair whose labels are
    equal counts as a positive (several captions can describe the same object). scale: the logit scale.
    Return the mean of the media->text and text->media cross-entropies (a scalar)."""
    raise NotImplementedError(
        "logits = scale * media_emb @ text_emb.T; the target of row i is spread evenly over the columns j "
        "with labels[j] == labels[i] (a soft target row summing to 1); F.cross_entropy accepts such "
        "probability targets. Average the loss of logits and of logits.T.")


def diffusion_loss(unet_fn, scheduler, latents, cond, generator):
    """One DDPM training step's loss (Ho et al. 2020, Algorithm 1).

    Draw t ~ U{0..T-1} for each latent (torch.randint(0, len(scheduler), (B,), generator=generator)), then
    noise ~ N(0, I) of the latents' shape with the same generator, in that order. Noise the latents to
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (scheduler.add_noise does it), and return the mean
    squared error between unet_fn(x_t, t, cond) and the noise."""
    raise NotImplementedError(
        "t = torch.randint(0, len(scheduler), (B,), generator=generator); noise = torch.randn(latents.shape, "
        "generator=generator); x_t = scheduler.add_noise(latents, noise, t); "
        "return F.mse_loss(unet_fn(x_t, t, cond), noise)")
