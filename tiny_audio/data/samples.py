"""A sample's two checkpoints: `admit` (raw bytes, header only) and `finish` (decoded waveform).

`admit` runs where the order is decided, so the bucketing plan depends only on the data; `finish` runs in the
decode threads and can only drop a sample from the batch it was planned into.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tiny_audio.data.audio import AudioError, decode, probe
from tiny_audio.data.filters import (
    DropReason,
    FilterSettings,
    TextNormalizer,
    check_duration,
    check_text,
    check_waveform,
)
from tiny_audio.data.sources import RowRef


@dataclass(frozen=True)
class Candidate:
    """A sample that passed the plan-time filters: raw bytes, clean text, duration from the header."""

    key: str
    index: int
    """Global raw-stream index (the position the order is a function of)."""
    audio: bytes
    text: str
    seconds: float


@dataclass(frozen=True)
class Ready:
    """A decoded sample that passed every filter."""

    key: str
    wave: np.ndarray
    text: str
    resampled: bool


def admit(
    row: RowRef,
    *,
    index: int,
    normalize: TextNormalizer,
    filters: FilterSettings,
    count_tokens: Callable[[str], int] | None,
) -> Candidate | DropReason:
    """Plan-time checks: transcript, then the audio header. Decodes nothing."""
    text = normalize(row.text())
    reason = check_text(text, max_label_tokens=filters.max_label_tokens, count_tokens=count_tokens)
    if reason is not None:
        return reason
    data = row.audio()
    try:
        info = probe(data)
    except AudioError:
        return DropReason.UNREADABLE
    reason = check_duration(info.seconds, min_seconds=filters.min_seconds, max_seconds=filters.max_seconds)
    if reason is not None:
        return reason
    assert data is not None  # probe accepted it
    return Candidate(key=row.key, index=index, audio=data, text=text, seconds=info.seconds)


def finish(candidate: Candidate, *, filters: FilterSettings) -> Ready | DropReason:
    """Decode-time checks: readable, finite, not silent, and the real duration within bounds."""
    try:
        decoded = decode(candidate.audio)
    except AudioError:
        return DropReason.UNREADABLE
    reason = check_waveform(decoded.wave, silence_rms=filters.silence_rms) or check_duration(
        decoded.seconds, min_seconds=filters.min_seconds, max_seconds=filters.max_seconds
    )
    if reason is not None:
        return reason
    return Ready(key=candidate.key, wave=decoded.wave, text=candidate.text, resampled=decoded.resampled)
