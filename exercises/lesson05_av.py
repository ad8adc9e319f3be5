"""Lesson 5 exercises: the audio vocoder and the frame axis of the video UNet.

Check your work:  python -m pytest tests/exercises/test_lesson05_av.py --exercises=mine
"""

import torch.nn.functional as F  # noqa: F401  (you will want F.conv1d and F.leaky_relu)


def hifigan_resblock(x, convs1, convs2, dilations, slope=0.1):
    """One branch of HiFi-GAN's multi-receptive-field fusion (Kong et al. 2020, Figure 1).

    x: (B, C, T). convs1 and convs2: lists of (weight (C, C, K), bias (C,)) pairs, one per dilation.
    For each (d, (w1, b1), (w2, b2)):
        x = x + conv(lrelu(conv_d(lrelu(x), w1, b1)), w2, b2)
    where conv_d is a 1-D convolution with dilation d and conv has dilation 1. Both keep the
    length T ("same" padding). lrelu has negative slope `slope`. Return (B, C, T)."""
    raise NotImplementedError(
        "Loop over zip(dilations, convs1, convs2). A kernel K with dilation d spans d*(K-1)+1 samples, "
        "so padding=d*(K-1)//2 keeps the length: F.conv1d(F.leaky_relu(x, slope), w1, b1, dilation=d, "
        "padding=d*(K-1)//2); the second conv uses dilation 1 and padding (K-1)//2; add the residual.")


def mrf(x, branches):
    """Multi-receptive-field fusion: the average of the branch outputs, branches being callables
    (B, C, T) -> (B, C, T), each with a different kernel size."""
    raise NotImplementedError(
        "Apply every branch to the same input x and divide the sum by len(branches): "
        "sum(branch(x) for branch in branches) / len(branches). Do not chain them.")


def fold_frames(x):
    """(B, C, F, H, W) -> (B*F, C, H, W), clip-major (all frames of clip 0 first), so that the
    2-D layers of an image UNet see every frame as one image."""
    raise NotImplementedError(
        "Move the frame axis next to the batch axis with x.permute(0, 2, 1, 3, 4) (now B, F, C, H, W), "
        "then merge the first two with .reshape(B * F, C, H, W); or einops 'b c f h w -> (b f) c h w'.")


def unfold_frames(x, num_frames):
    """(B*F, C, H, W) -> (B, C, F, H, W), the inverse of fold_frames."""
    raise NotImplementedError(
        "Split the batch axis: x.reshape(-1, num_frames, C, H, W) gives (B, F, C, H, W); then "
        "permute(0, 2, 1, 3, 4) to put the channels before the frames.")


def pixels_as_sequences(x, num_frames):
    """(B*F, C, H, W) -> (B*H*W, F, C): for temporal attention every pixel position of every clip
    becomes one sequence of F tokens of C channels."""
    raise NotImplementedError(
        "Unfold to (B, F, C, H, W), permute to (B, H, W, F, C) so the pixel axes follow the batch and "
        "the frame axis is the sequence axis, then reshape to (B*H*W, F, C).")


def sequences_as_pixels(x, height, width):
    """(B*H*W, F, C) -> (B*F, C, H, W), the inverse of pixels_as_sequences."""
    raise NotImplementedError(
        "Reshape to (B, H, W, F, C) with B = x.shape[0] // (height*width), permute to (B, F, C, H, W) "
        "and merge B and F: .reshape(B * F, C, height, width).")
