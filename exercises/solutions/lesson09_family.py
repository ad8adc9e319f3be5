"""Lesson 9 solutions: minignext's own code."""

from minignext.systems.llava import select_features, splice_image_features  # noqa: F401
from minignext.toy.mllm import tokens_with_labels  # noqa: F401
