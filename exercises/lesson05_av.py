"""Lesson 5 exercises: the audio vocoder and the frame axis of the video UNet, then a whole
temporal attention layer.

Solve these before you read minignext/vocoder.py and minignext/unet3d.py; then compare. Each
function raises NotImplementedError with a first hint; more hints, each closer to code, are in
HINTS at the bottom of this file. Look at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson05_av.py --exercises=mine
"""

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401


def hifigan_resblock(x, convs1, convs2, dilations, slope=0.1):
    """One branch of HiFi-GAN's multi-receptive-field fusion (Kong et al. 2020, Figure 1).

    x: (B, C, T). convs1 and convs2: lists of (weight (C, C, K), bias (C,)) pairs, one per dilation.
    For each (d, (w1, b1), (w2, b2)):
        x = x + conv(lrelu(conv_d(lrelu(x), w1, b1)), w2, b2)
    where conv_d is a 1-D convolution with dilation d and conv has dilation 1. Both keep the
    length T ("same" padding). lrelu has negative slope `slope`. Return (B, C, T)."""
    raise _stuck("hifigan_resblock")


def mrf(x, branches):
    """Multi-receptive-field fusion: the average of the branch outputs, branches being callables
    (B, C, T) -> (B, C, T), each with a different kernel size."""
    raise _stuck("mrf")


def fold_frames(x):
    """(B, C, F, H, W) -> (B*F, C, H, W), clip-major (all frames of clip 0 first), so that the
    2-D layers of an image UNet see every frame as one image."""
    raise _stuck("fold_frames")


def unfold_frames(x, num_frames):
    """(B*F, C, H, W) -> (B, C, F, H, W), the inverse of fold_frames."""
    raise _stuck("unfold_frames")


def pixels_as_sequences(x, num_frames):
    """(B*F, C, H, W) -> (B*H*W, F, C): for temporal attention every pixel position of every clip
    becomes one sequence of F tokens of C channels."""
    raise _stuck("pixels_as_sequences")


def sequences_as_pixels(x, height, width):
    """(B*H*W, F, C) -> (B*F, C, H, W), the inverse of pixels_as_sequences."""
    raise _stuck("sequences_as_pixels")


def temporal_attention(x, layer, num_frames):
    """A whole temporal attention layer of the video UNet (ZeroScope's TransformerTemporalModel),
    from your reshapes: x (B*F, C, H, W), frames folded into the batch; return the same shape.

    `layer` has the parts: layer.norm (a GroupNorm whose statistics cover all frames of a clip,
    so it must see (B, C, F, H, W)), layer.proj_in (Linear C -> inner), layer.transformer_blocks
    (modules called as block(sequences, None) on (N, F, inner)), layer.proj_out (Linear inner -> C).
    The layer is residual: its result is added to x."""
    raise _stuck("temporal_attention")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "hifigan_resblock": [
        "A loop of residual pairs: each pair is two leaky-ReLU-then-convolution stages, the first "
        "one dilated, and adds its result to the running signal. The only delicate part is the "
        "padding: a dilated kernel reaches further, so it needs more padding to keep the length.",
        "A kernel of size K with dilation d spans d (K - 1) + 1 samples; padding d (K - 1) / 2 on "
        "each side keeps T (K is odd). F.conv1d takes weight, bias, padding and dilation; "
        "F.leaky_relu takes the slope.",
        "for d, (w1, b1), (w2, b2) in zip(dilations, convs1, convs2): K = w1.shape[-1]; y = "
        "F.conv1d(F.leaky_relu(x, slope), w1, b1, dilation=d, padding=d * (K - 1) // 2); y = "
        "F.conv1d(F.leaky_relu(y, slope), w2, b2, padding=(K - 1) // 2); x = x + y; return x",
    ],
    "mrf": [
        "The branches run side by side on the same input, not one after another, and their "
        "outputs are averaged.",
        "Call every branch on x, add the results, divide by how many branches there are.",
        "return sum(branch(x) for branch in branches) / len(branches)",
    ],
    "fold_frames": [
        "Bring the frame axis next to the batch axis, then merge the two into one batch axis, so "
        "that clip 0's frames come first.",
        "A permute swaps the channel and frame axes: (B, F, C, H, W). A reshape then merges B and "
        "F (reshape copies when the memory is not in that order, which is fine).",
        "b, c, f, h, w = x.shape; return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)",
    ],
    "unfold_frames": [
        "Undo the fold: split the batch axis into (clips, frames), then put the channels back "
        "before the frames.",
        "The number of clips is the folded batch divided by num_frames; reshape to (B, F, C, H, W) "
        "and permute the frame and channel axes.",
        "bf, c, h, w = x.shape; return x.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)",
    ],
    "pixels_as_sequences": [
        "Every pixel position of every clip becomes one sequence over time: the frame axis "
        "becomes the sequence axis, the channels the features, and clip and pixel position "
        "together the batch.",
        "Unfold the batch into (B, F, C, H, W), permute to (B, H, W, F, C) and merge the first "
        "three axes.",
        "bf, c, h, w = x.shape; b = bf // num_frames; return x.reshape(b, num_frames, c, h, w)"
        ".permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)",
    ],
    "sequences_as_pixels": [
        "The inverse of pixels_as_sequences: split the batch of sequences back into clips and "
        "pixel positions, and fold the frames into the batch again.",
        "The number of clips is the number of sequences divided by height * width. Reshape to "
        "(B, H, W, F, C), permute to (B, F, C, H, W) and merge B and F.",
        "n, f, c = x.shape; b = n // (height * width); return x.reshape(b, height, width, f, c)"
        ".permute(0, 3, 4, 1, 2).reshape(b * f, c, height, width)",
    ],
    "temporal_attention": [
        "Normalise, turn every pixel into a sequence over the frames, project in, run the "
        "transformer blocks, project out, turn the sequences back into frames, and add the result "
        "to the input.",
        "The GroupNorm must see whole clips: unfold before it and fold after it. The height and "
        "width for the way back are x's last two dims.",
        "h, w = x.shape[-2:]; y = fold_frames(layer.norm(unfold_frames(x, num_frames))); y = "
        "layer.proj_in(pixels_as_sequences(y, num_frames)); for block in layer.transformer_blocks: "
        "y = block(y, None); return x + sequences_as_pixels(layer.proj_out(y), h, w)",
    ],
}
