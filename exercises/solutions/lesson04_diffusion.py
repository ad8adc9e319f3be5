"""Lesson 4 solutions: minignext's own functions."""

from minignext.diffusion import classifier_free_guidance
from minignext.schedulers import ddim_update, q_sample as add_noise
from minignext.unet import timestep_embedding

__all__ = ["timestep_embedding", "add_noise", "ddim_step", "classifier_free_guidance"]


def ddim_step(eps, x_t, alpha_bar_t, alpha_bar_prev):
    x0 = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5
    return ddim_update(x0, eps, alpha_bar_prev)
