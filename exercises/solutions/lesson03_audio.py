"""Lesson 3 solutions (audio): minignext's own code."""

from minignext.media import hz_to_mel, mel_filterbank, mel_to_hz  # noqa: F401
