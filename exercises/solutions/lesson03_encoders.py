"""Lesson 3 solutions (vision), written out. minignext/clip.py has `patchify` and
`interpolate_pos_embed` (with einops) and CLIPVisionEmbeddings, which uses a Conv2d for the patches."""

import torch
import torch.nn.functional as F


def patchify(images, patch_size):
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    # split H and W into (tiles, pixels), then order: batch, tile row, tile col, channel, row, col
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def interpolate_pos_embed(pos_embed, old_grid, new_grid):
    old_h, old_w = (old_grid, old_grid) if isinstance(old_grid, int) else old_grid
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    d = pos_embed.shape[1]
    grid = pos_embed[1:].reshape(old_h, old_w, d).permute(2, 0, 1)[None]     # a D-channel picture
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:1], grid[0].permute(1, 2, 0).reshape(new_h * new_w, d)])


def vision_tokens(pixels, patch_weight, class_embedding, position_table, grid):
    b, _, h, w = pixels.shape
    p = patch_weight.shape[-1]
    patches = patchify(pixels, p) @ patch_weight.flatten(1).T           # the stride-p convolution
    cls = class_embedding.expand(b, 1, -1)
    pos = interpolate_pos_embed(position_table, grid, (h // p, w // p))
    return torch.cat([cls, patches], dim=1) + pos
