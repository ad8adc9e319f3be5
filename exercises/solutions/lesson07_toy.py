"""Lesson 7 solutions, written out. The trainers' versions: `info_nce` in
minignext/toy/train_imagebind.py and `diffusion_loss` in minignext/toy/latent_diffusion.py
(which can also draw half of each batch from the noisiest steps)."""

import torch
import torch.nn.functional as F


def info_nce(media_emb, text_emb, labels, scale):
    logits = scale * media_emb @ text_emb.T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)        # every same-class caption is a right answer
    # the positives are symmetric, so text -> media uses the transposed logits with the same targets
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def diffusion_loss(unet_fn, scheduler, latents, cond, generator):
    t = torch.randint(0, len(scheduler), (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    x_t = scheduler.add_noise(latents, noise, t)
    return F.mse_loss(unet_fn(x_t, t, cond), noise)         # the model predicts the noise (eps)


def train_denoiser(unet_fn, parameters, scheduler, latents, cond, steps, lr, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = diffusion_loss(unet_fn, scheduler, latents, cond, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
