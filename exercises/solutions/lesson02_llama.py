"""Lesson 2 solutions: minignext's own code."""

from minignext.llama import apply_rope, kv_cache_update, rms_norm  # noqa: F401
