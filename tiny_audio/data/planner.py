"""The planner turns the raw streams into batches of raw samples, deterministically, without decoding audio.

Global index i draws a source (a function of seed and i), takes that source's next row, and belongs to rank
i mod world_size. A rank gathers `bucket_batches * batch_size` of its own samples that pass the plan-time
filters into a window, sorts the window by duration (from the audio headers) and cuts it into batches whose
order is shuffled with a generator seeded by the window's start. So a window is a pure function of where it
starts: a position (global index + one cursor per source) is all a checkpoint needs, plus how many of the
window's batches were already handed out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tiny_audio.data.batching import bucket
from tiny_audio.data.filters import FilterSettings, TextNormalizer
from tiny_audio.data.order import Cursor, SourceChooser, window_rng
from tiny_audio.data.samples import Candidate, admit
from tiny_audio.data.sources import SourceReader
from tiny_audio.errors import UserError


@dataclass
class Position:
    """Where the raw stream stands: the next global index and each source's cursor."""

    index: int
    cursors: list[Cursor]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "sources": [c.to_list() for c in self.cursors]}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Position:
        index = int(value["index"])
        if index < 0:
            raise ValueError(f"a data position cannot be negative: {index}")
        return cls(index=index, cursors=[Cursor.from_list(c) for c in value["sources"]])


@dataclass
class Window:
    start: Position
    end: Position
    batches: list[list[Candidate]]
    drops: Counter[str] = field(default_factory=Counter)
    """Plan-time drops met while gathering this window, by reason."""


@dataclass
class PlannedBatch:
    samples: list[Candidate]
    state_after: dict[str, Any]
    """Stream state once this batch is handed out: {"position": ..., "batches_done": ...}."""
    drops: Counter[str]


class Planner:
    """Raw rows -> windows of length-bucketed batches of candidates, for one rank."""

    def __init__(
        self,
        *,
        readers: Sequence[SourceReader],
        normalizers: Sequence[TextNormalizer],
        weights: Sequence[float],
        filters: FilterSettings,
        count_tokens: Callable[[str], int] | None,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        bucket_batches: int,
        shuffle: bool,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self._readers, self._normalizers = list(readers), list(normalizers)
        self._choose = SourceChooser(weights, seed=seed)
        self._filters, self._count_tokens = filters, count_tokens
        self._seed, self._rank, self._world_size = seed, rank, world_size
        self._batch_size, self._bucket_batches, self._shuffle = batch_size, bucket_batches, shuffle
        self._index = 0

    @property
    def position(self) -> Position:
        return Position(index=self._index, cursors=[r.cursor for r in self._readers])

    def seek(self, position: Position) -> None:
        if len(position.cursors) != len(self._readers):
            raise ValueError(f"position has {len(position.cursors)} source cursors, the config {len(self._readers)}")
        for reader, cursor in zip(self._readers, position.cursors, strict=True):
            reader.seek(cursor)
        self._index = position.index

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def next_window(self) -> Window:
        start = self.position
        wanted = self._batch_size * self._bucket_batches
        picked: list[Candidate] = []
        drops: Counter[str] = Counter()
        epochs_at_last_keep = [c.epoch for c in start.cursors]
        while len(picked) < wanted:
            index = self._index
            source = self._choose(index)
            row = self._readers[source].next()
            self._index += 1
            if index % self._world_size != self._rank:
                continue  # another rank's sample: its bytes are never touched
            outcome = admit(
                row,
                index=index,
                normalize=self._normalizers[source],
                filters=self._filters,
                count_tokens=self._count_tokens,
            )
            if isinstance(outcome, Candidate):
                picked.append(outcome)
                epochs_at_last_keep = [r.cursor.epoch for r in self._readers]
                continue
            drops[outcome.value] += 1
            if all(r.cursor.epoch >= e + 2 for r, e in zip(self._readers, epochs_at_last_keep, strict=True)):
                raise UserError(
                    f"no training sample passes the filters in a whole epoch of every source (dropped: {dict(drops)}); "
                    "check data.min_seconds / max_seconds / max_label_tokens and the audio and text columns"
                )
        rng = window_rng(seed=self._seed, rank=self._rank, start_index=start.index) if self._shuffle else None
        groups = bucket([c.seconds for c in picked], batch_size=self._batch_size, rng=rng)
        return Window(start=start, end=self.position, batches=[[picked[j] for j in g] for g in groups], drops=drops)

    def batches(self, *, skip: int = 0) -> Iterator[PlannedBatch]:
        """Planned batches forever; the first `skip` batches of the first window are planned but not yielded."""
        while True:
            window = self.next_window()
            drops = window.drops
            last = len(window.batches) - 1
            for j, samples in enumerate(window.batches):
                if j < skip:
                    continue
                if j == last:
                    state = {"position": window.end.to_dict(), "batches_done": 0}
                else:
                    state = {"position": window.start.to_dict(), "batches_done": j + 1}
                yield PlannedBatch(samples=samples, state_after=state, drops=drops)
                drops = Counter()
            skip = 0
