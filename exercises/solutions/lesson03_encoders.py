"""Lesson 3 solutions: the library's own functions (minignext/clip.py)."""

from minignext.clip import interpolate_pos_embed, patchify

__all__ = ["patchify", "interpolate_pos_embed"]
