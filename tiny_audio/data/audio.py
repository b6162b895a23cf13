"""Audio bytes -> mono float32 at 16 kHz, with soundfile and soxr (never datasets' torchcodec decoder).

`probe` reads only the header (frames, sample rate), which is what length bucketing needs: a window of samples
can be planned, and re-planned on resume, without decoding anything. `decode` does the real work; soundfile
(cffi) and soxr both release the GIL, so threads decode in parallel.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
"""The rate every clip is resampled to (what the encoder's feature extractor expects)."""


class AudioError(Exception):
    """The bytes cannot be read as audio."""


@dataclass(frozen=True)
class AudioInfo:
    frames: int
    sample_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


# soundfile raises its own errors for bad data; a malformed container can also surface as these built-ins.
_READ_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError, OverflowError)


def probe(data: bytes | None) -> AudioInfo:
    """Frames, sample rate and channels from the header alone (no decode). Raises AudioError."""
    if not data:
        raise AudioError("no audio bytes")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            info = AudioInfo(frames=int(f.frames), sample_rate=int(f.samplerate), channels=int(f.channels))
    except _READ_ERRORS as exc:
        raise AudioError(str(exc)) from exc
    if info.sample_rate <= 0 or info.frames < 0:
        raise AudioError(f"impossible header: {info}")
    return info


@dataclass(frozen=True)
class Decoded:
    wave: np.ndarray
    """Mono float32 at SAMPLE_RATE (left at the source rate when it holds non-finite values: it is dropped)."""
    seconds: float
    """Duration at the source rate, before resampling (the same measure as the header's)."""
    resampled: bool


def decode(data: bytes | None) -> Decoded:
    """Bytes -> mono float32 waveform at 16 kHz. Raises AudioError."""
    if not data:
        raise AudioError("no audio bytes")
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except _READ_ERRORS as exc:
        raise AudioError(str(exc)) from exc
    mono = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    seconds = mono.shape[0] / rate
    if rate == SAMPLE_RATE or not np.isfinite(mono).all():  # soxr would only smear NaNs over the clip
        return Decoded(np.ascontiguousarray(mono), seconds, resampled=False)
    out = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return Decoded(out, seconds, resampled=True)
