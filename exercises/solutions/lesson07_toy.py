"""Lesson 7 solutions: the losses the toy trainers use."""

from minignext.toy.latent_diffusion import diffusion_loss  # noqa: F401
from minignext.toy.train_imagebind import info_nce  # noqa: F401
