"""Lesson 3 exercises: how a vision transformer turns an image into tokens.

Solve these before you read minignext/clip.py; then compare. Each function raises
NotImplementedError with a first hint; more hints, each closer to code, are in HINTS at the
bottom of this file. Look at them one at a time, only when stuck.

Check your work:  .venv/bin/python -m pytest tests/exercises/test_lesson03_encoders.py --exercises=mine
"""

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401


def patchify(images, patch_size):
    """Cut images (B, C, H, W) into non-overlapping p x p patches and flatten each one.

    Return (B, N, C * p * p) with N = (H / p) * (W / p): patches in reading order (left to right,
    then top to bottom), each patch flattened channel first, then rows, then columns -- the
    order of a Conv2d weight (D, C, p, p).flatten(1), so that a linear layer on the patches is
    the patch-embedding convolution. Raise ValueError if H or W is not a multiple of p."""
    raise _stuck("patchify")


def interpolate_pos_embed(pos_embed, old_grid, new_grid):
    """Resize a ViT position table for another image size.

    pos_embed is (1 + old_h * old_w, D): row 0 belongs to the class token, the other rows to the
    patches of an old_h x old_w grid in reading order. A grid is an int (square) or (h, w).
    Return (1 + new_h * new_w, D): the class row unchanged, the patch rows resampled bicubically
    (align_corners=False) as a D-channel picture of size new_h x new_w."""
    raise _stuck("interpolate_pos_embed")


def vision_tokens(pixels, patch_weight, class_embedding, position_table, grid):
    """The input sequence of a CLIP vision transformer, from your patchify and interpolate_pos_embed.

    pixels (B, C, H, W); patch_weight (D, C, p, p), the patch-embedding convolution's weight (no
    bias); class_embedding (D,); position_table (1 + grid_h * grid_w, D) learned for `grid`.
    Return (B, 1 + N, D): the class token followed by the N embedded patches, plus the position
    table (resampled when the image's patch grid differs from `grid`)."""
    raise _stuck("vision_tokens")


def _stuck(name):
    return NotImplementedError(f"{name}: {HINTS[name][0]}\n(Stuck? {len(HINTS[name]) - 1} more hints, "
                               f"each closer to code, in HINTS[{name!r}] at the bottom of this file.)")


HINTS = {
    "patchify": [
        "Think of each image as a grid of tiles: split the height into (rows of tiles, pixels per "
        "tile) and the width likewise, then bring the two tile axes to the front and the three "
        "within-tile axes (channel, row, column) to the back, in that order.",
        "A reshape can split H into (H/p, p) and W into (W/p, p) without moving data. A permute "
        "then orders the axes as batch, tile row, tile column, channel, pixel row, pixel column. A "
        "final reshape merges the two tile axes into N and the three pixel axes into C*p*p. Check "
        "the divisibility first.",
        "x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5); "
        "return x.reshape(B, (H // p) * (W // p), C * p * p)   (or einops: "
        "'b c (h p) (w q) -> b (h w) (c p q)')",
    ],
    "interpolate_pos_embed": [
        "The patch rows of the table are a small picture with D channels, one pixel per patch. "
        "Resizing the table is resizing that picture; the class token has no place in it and "
        "keeps its row.",
        "Separate row 0. Lay the other rows out as (old_h, old_w, D), move D to the channel axis "
        "and add a batch axis: (1, D, old_h, old_w). Resize with bicubic interpolation, "
        "align_corners=False. Move the channels back last, flatten the grid, and put the class row "
        "back in front.",
        "grid = pos_embed[1:].reshape(old_h, old_w, D).permute(2, 0, 1)[None]; grid = "
        "F.interpolate(grid, size=(new_h, new_w), mode='bicubic', align_corners=False); "
        "return torch.cat([pos_embed[:1], grid[0].permute(1, 2, 0).reshape(-1, D)])",
    ],
    "vision_tokens": [
        "Three things are added up: the embedded patches (a matrix product, because a stride-p "
        "convolution is a linear layer on flattened patches), a class token in front of them, and "
        "a position vector for every place in the sequence.",
        "The patch embedding is patchify(pixels, p) times the flattened convolution weight, "
        "transposed: (B, N, C*p*p) @ (C*p*p, D). The class embedding is the same for every image: "
        "expand it to (B, 1, D). The image's patch grid is (H / p, W / p); if it is not `grid`, "
        "resize the table with your interpolate_pos_embed.",
        "p = patch_weight.shape[-1]; patches = patchify(pixels, p) @ patch_weight.flatten(1).T; cls = "
        "class_embedding.expand(B, 1, -1); pos = interpolate_pos_embed(position_table, grid, (H // p, "
        "W // p)); return torch.cat([cls, patches], dim=1) + pos",
    ],
}
