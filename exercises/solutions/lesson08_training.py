"""Lesson 8 solutions: minignext's own code."""

from minignext.systems.nextgpt import freeze_old_rows  # noqa: F401
from minignext.toy.mllm import answer_ce  # noqa: F401
from minignext.toy.train_nextgpt import signal_distance  # noqa: F401
from minignext.weights import merge_lora  # noqa: F401
