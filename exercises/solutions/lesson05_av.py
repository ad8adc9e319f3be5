"""Lesson 5 solutions: minignext's own code."""

import torch

from minignext.unet3d import fold_frames, pixels_as_sequences, sequences_as_pixels, unfold_frames  # noqa: F401
from minignext.vocoder import ResBlock, mrf  # noqa: F401


def hifigan_resblock(x, convs1, convs2, dilations, slope=0.1):
    channels, _, kernel = convs1[0][0].shape
    block = ResBlock(channels, kernel, dilations, slope)
    state = {}
    for i, ((w1, b1), (w2, b2)) in enumerate(zip(convs1, convs2)):
        state.update({f"convs1.{i}.weight": w1, f"convs1.{i}.bias": b1,
                      f"convs2.{i}.weight": w2, f"convs2.{i}.bias": b2})
    block.load_state_dict(state)
    with torch.no_grad():
        return block(x)
