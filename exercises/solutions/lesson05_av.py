"""Lesson 5 solutions, written out. The library's versions: ResBlock and `mrf` in
minignext/vocoder.py; the four reshapes (with einops) and TransformerTemporalModel in
minignext/unet3d.py."""

import torch.nn.functional as F


def hifigan_resblock(x, convs1, convs2, dilations, slope=0.1):
    for d, (w1, b1), (w2, b2) in zip(dilations, convs1, convs2):
        k = w1.shape[-1]
        # a dilated kernel spans d*(k-1)+1 samples: pad half of the extra on each side
        y = F.conv1d(F.leaky_relu(x, slope), w1, b1, dilation=d, padding=d * (k - 1) // 2)
        y = F.conv1d(F.leaky_relu(y, slope), w2, b2, padding=(k - 1) // 2)
        x = x + y
    return x


def mrf(x, branches):
    return sum(branch(x) for branch in branches) / len(branches)      # side by side, not chained


def fold_frames(x):
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def unfold_frames(x, num_frames):
    bf, c, h, w = x.shape
    return x.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def pixels_as_sequences(x, num_frames):
    bf, c, h, w = x.shape
    b = bf // num_frames
    return x.reshape(b, num_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)


def sequences_as_pixels(x, height, width):
    n, f, c = x.shape
    b = n // (height * width)
    return x.reshape(b, height, width, f, c).permute(0, 3, 4, 1, 2).reshape(b * f, c, height, width)


def temporal_attention(x, layer, num_frames):
    h, w = x.shape[-2:]
    y = fold_frames(layer.norm(unfold_frames(x, num_frames)))        # GroupNorm over whole clips
    y = layer.proj_in(pixels_as_sequences(y, num_frames))
    for block in layer.transformer_blocks:
        y = block(y, None)
    return x + sequences_as_pixels(layer.proj_out(y), h, w)
