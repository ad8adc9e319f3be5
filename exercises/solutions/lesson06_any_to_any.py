"""Lesson 6 solutions: minignext's own code."""

from minignext.systems.nextgpt import extract_signal_states, splice_soft_tokens  # noqa: F401
