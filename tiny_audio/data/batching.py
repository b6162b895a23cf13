"""Batches: length bucketing (which samples go together) and collation (padding to the longest clip only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """A micro-batch of 16 kHz mono audio and its transcripts."""

    audio: torch.Tensor
    """[B, S] float32, zero-padded to the longest clip of the batch."""
    audio_lengths: torch.Tensor
    """[B] int64: valid samples of each row."""
    texts: list[str]
    """Normalised transcripts."""
    keys: list[str]
    """Stable sample ids `<source>/<shard>/<row>`."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def padding(self) -> tuple[int, int]:
        """(padded sample slots, all sample slots) of `audio`."""
        total = int(self.audio.shape[0] * self.audio.shape[1])
        return total - int(self.audio_lengths.sum()), total


def collate(waves: Sequence[np.ndarray], *, texts: Sequence[str], keys: Sequence[str]) -> Batch:
    """Stack mono float32 waveforms into one zero-padded [B, S] tensor."""
    lengths = [int(w.shape[0]) for w in waves]
    audio = np.zeros((len(waves), max(lengths, default=0)), dtype=np.float32)
    for row, wave in zip(audio, waves, strict=True):
        row[: wave.shape[0]] = wave
    return Batch(
        audio=torch.from_numpy(audio),
        audio_lengths=torch.tensor(lengths, dtype=torch.int64),
        texts=list(texts),
        keys=list(keys),
    )


def bucket(durations: Sequence[float], *, batch_size: int, rng: np.random.Generator | None) -> list[list[int]]:
    """Indices of a window's samples grouped into batches of similar duration.

    The window is sorted by duration (ties by position) and cut into consecutive batches, whose order is then
    shuffled with `rng` (None keeps shortest first). A window of one batch is plain batching.
    """
    order = sorted(range(len(durations)), key=lambda j: (durations[j], j))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if rng is not None and len(batches) > 1:
        batches = [batches[p] for p in rng.permutation(len(batches))]
    return batches
