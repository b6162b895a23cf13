"""The sample order as pure functions of (seed, epoch, position), so a resumed stream is bit-for-bit the same.

Nothing here depends on time, thread scheduling or how many workers decode:
- per source and epoch, a seeded permutation of its shards;
- within a shard, blocks of `block_rows` consecutive rows, each permuted with its own seeded generator;
- the source drawn at global raw-stream index i is a function of (seed, i) only;
- rank r of world_size takes the global indices i ≡ r (mod world_size), so every rank cuts the same global order.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import IntEnum

import numpy as np

_MASK64 = (1 << 64) - 1


class Stream(IntEnum):
    """Separates the random streams derived from one seed, so none can echo another."""

    SHARDS = 1
    BLOCK = 2
    INTERLEAVE = 3
    WINDOW = 4


def derive_rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """A generator that depends only on (seed, stream, keys): the same on every machine and every run."""
    return np.random.default_rng(np.random.SeedSequence([seed & _MASK64, int(stream), *keys]))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def unit_uniform(seed: int, index: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, index): a counter-based draw, no state to save."""
    return _splitmix64(_splitmix64((seed & _MASK64) ^ int(Stream.INTERLEAVE)) ^ index) / 2.0**64


class SourceChooser:
    """Which source feeds global index i, drawn in proportion to the weights."""

    def __init__(self, weights: Sequence[float], *, seed: int) -> None:
        if not weights or any(w <= 0 for w in weights):
            raise ValueError(f"source weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self._cumulative = list(np.cumsum([w / total for w in weights]))
        self._cumulative[-1] = 1.0
        self._seed = seed

    def __call__(self, index: int) -> int:
        if len(self._cumulative) == 1:
            return 0
        return bisect.bisect_right(self._cumulative, unit_uniform(self._seed, index))


def shard_order(*, seed: int, source: int, epoch: int, num_shards: int, shuffle: bool) -> list[int]:
    """The order of a source's shards in one epoch."""
    if not shuffle:
        return list(range(num_shards))
    return derive_rng(seed, Stream.SHARDS, source, epoch).permutation(num_shards).tolist()


def block_order(*, seed: int, source: int, epoch: int, shard: int, block: int, rows: int, shuffle: bool) -> list[int]:
    """The order in which the rows of one block (read whole) are handed out."""
    if not shuffle:
        return list(range(rows))
    return derive_rng(seed, Stream.BLOCK, source, epoch, shard, block).permutation(rows).tolist()


def window_rng(*, seed: int, rank: int, start_index: int) -> np.random.Generator:
    """Shuffles the batch order of the bucketing window that starts at this global index."""
    return derive_rng(seed, Stream.WINDOW, rank, start_index)


@dataclass
class Cursor:
    """Where one source stands: `row` rows of the `shard`-th shard (in this epoch's order) handed out."""

    epoch: int = 0
    shard: int = 0
    row: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.shard, self.row]

    @classmethod
    def from_list(cls, value: Sequence[int]) -> Cursor:
        epoch, shard, row = (int(v) for v in value)
        if min(epoch, shard, row) < 0:
            raise ValueError(f"a data cursor cannot be negative: {list(value)}")
        return cls(epoch=epoch, shard=shard, row=row)

    def copy(self) -> Cursor:
        return Cursor(**asdict(self))
