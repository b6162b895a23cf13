"""Which samples are kept: transcript normalisation and the filters, each drop counted under its reason.

Filters run in two places. At plan time (raw bytes in hand, no decode): transcript checks and the duration read
from the audio header. At decode time: unreadable data, non-finite values, silence, and the duration again (a
header can lie). A bad sample is dropped and counted; it never stops the stream.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from tiny_audio.errors import ConfigError


class DropReason(StrEnum):
    """Why a sample was dropped; `stats()` reports each as `dropped/<value>`."""

    UNREADABLE = "unreadable"
    """The bytes are not audio soundfile can read (or there are none)."""
    NON_FINITE = "nan"
    """The decoded waveform holds NaN or infinite values."""
    SILENCE = "silence"
    """RMS below `silence_rms`."""
    TOO_LONG = "too_long"
    """Longer than `max_seconds` (dropped, never truncated)."""
    TOO_SHORT = "too_short"
    """Shorter than `min_seconds`."""
    EMPTY_TEXT = "empty_text"
    """Nothing left of the transcript once markers are stripped."""
    TOO_MANY_TOKENS = "too_many_tokens"
    """More than `max_label_tokens` tokens."""


@dataclass(frozen=True)
class FilterSettings:
    """The thresholds of `DataConfig`, as plain values."""

    min_seconds: float
    max_seconds: float
    max_label_tokens: int
    silence_rms: float


class TextNormalizer:
    """One source's transcript clean-up: strip marker patterns, collapse whitespace, optionally lower-case."""

    def __init__(self, *, strip_patterns: Iterable[str], lowercase: bool, source: str = "a source") -> None:
        self._patterns: list[re.Pattern[str]] = []
        for pattern in strip_patterns:
            try:
                self._patterns.append(re.compile(pattern))
            except re.error as exc:
                raise ConfigError(
                    f"strip_patterns of {source}: '{pattern}' is not a valid regular expression ({exc})"
                ) from None
        self._lowercase = lowercase

    def __call__(self, text: object) -> str:
        out = "" if text is None else str(text)
        for pattern in self._patterns:
            out = pattern.sub(" ", out)
        out = " ".join(out.split())
        return out.lower() if self._lowercase else out


def check_text(text: str, *, max_label_tokens: int, count_tokens: Callable[[str], int] | None) -> DropReason | None:
    """Reason to drop a normalised transcript, or None to keep it."""
    if not text:
        return DropReason.EMPTY_TEXT
    if count_tokens is not None and count_tokens(text) > max_label_tokens:
        return DropReason.TOO_MANY_TOKENS
    return None


def check_duration(seconds: float, *, min_seconds: float, max_seconds: float) -> DropReason | None:
    """Reason to drop a clip of this length, or None to keep it."""
    if seconds > max_seconds:
        return DropReason.TOO_LONG
    if seconds < min_seconds:
        return DropReason.TOO_SHORT
    return None


def check_waveform(wave: np.ndarray, *, silence_rms: float) -> DropReason | None:
    """Reason to drop a decoded mono waveform (float32), or None to keep it."""
    if not np.isfinite(wave).all():
        return DropReason.NON_FINITE
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if wave.size else 0.0
    if rms < silence_rms:
        return DropReason.SILENCE
    return None
