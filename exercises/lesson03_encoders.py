"""Lesson 3 exercises: how a vision transformer turns an image into tokens.

Check your work:  python -m pytest tests/exercises/test_lesson03_encoders.py --exercises=mine
"""

import torch


def patchify(images, patch_size):
    """Cut images (B, C, H, W) into non-overlapping p x p patches and flatten each one.

    Return (B, N, C * p * p) with N = (H / p) * (W / p): patches in reading order (left to right,
    then top to bottom), each patch flattened channel first, then rows, then columns -- the
    order of a Conv2d weight (D, C, p, p).flatten(1), so that a linear layer on the patches is
    the patch-embedding convolution. Raise ValueError if H or W is not a multiple of p."""
    raise NotImplementedError(
        "Reshape to (B, C, H/p, p, W/p, p), permute to (B, H/p, W/p, C, p, p), then reshape to "
        "(B, (H/p)*(W/p), C*p*p); or one einops call: 'b c (h p) (w q) -> b (h w) (c p q)'.")


def interpolate_pos_embed(pos_embed, old_grid, new_grid):
    """Resize a ViT position table for another image size.

    pos_embed is (1 + old_h * old_w, D): row 0 belongs to the class token, the other rows to the
    patches of an old_h x old_w grid in reading order. A grid is an int (square) or (h, w).
    Return (1 + new_h * new_w, D): the class row unchanged, the patch rows resampled bicubically
    (align_corners=False) as a D-channel picture of size new_h x new_w."""
    raise NotImplementedError(
        "Split off row 0; reshape the rest to (old_h, old_w, D), permute to (1, D, old_h, old_w), "
        "torch.nn.functional.interpolate(..., size=(new_h, new_w), mode='bicubic', align_corners=False), "
        "permute back, flatten to (new_h * new_w, D) and concatenate the class row in front.")
