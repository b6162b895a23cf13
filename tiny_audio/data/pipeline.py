"""The training stream: planned batches decoded ahead in threads, handed out in order, resumable exactly.

    sources (raw rows) -> planner (interleave, rank split, plan-time filters, length buckets)
        -> decode threads (soundfile + soxr, decode-time filters, collate) -> next(stream)

One thread plans (it owns the readers); `num_workers` threads decode up to `prefetch_batches` batches ahead.
The order never depends on the threads: batches are planned one after another and handed out in plan order.
Each planned batch carries the stream state that holds once it has been handed out, so `state_dict()` is the
position of the next batch whatever is in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from tiny_audio.config import DataConfig
from tiny_audio.data.audio import SAMPLE_RATE
from tiny_audio.data.batching import Batch, collate
from tiny_audio.data.filters import DropReason, FilterSettings, TextNormalizer
from tiny_audio.data.planner import PlannedBatch, Planner, Position
from tiny_audio.data.samples import Ready, finish
from tiny_audio.data.sources import SourceReader, open_source
from tiny_audio.errors import UserError
from tiny_audio.progress import Ticker, format_seconds

log = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass
class DecodedBatch:
    batch: Batch | None
    """None when every sample of the planned batch failed a decode-time filter."""
    state_after: dict[str, Any]
    drops: Counter[str]
    decoded: int
    """Samples whose audio was decoded (or tried)."""
    resampled: int


def decode_planned(planned: PlannedBatch, *, filters: FilterSettings) -> DecodedBatch:
    """Decode one planned batch (runs in a decode thread)."""
    drops = Counter(planned.drops)
    ready: list[Ready] = []
    for candidate in planned.samples:
        outcome = finish(candidate, filters=filters)
        if isinstance(outcome, Ready):
            ready.append(outcome)
        else:
            drops[outcome.value] += 1
    batch = (
        collate([r.wave for r in ready], texts=[r.text for r in ready], keys=[r.key for r in ready]) if ready else None
    )
    return DecodedBatch(batch, planned.state_after, drops, len(planned.samples), sum(r.resampled for r in ready))


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class TrainStream:
    """An endless iterator of `Batch`es for one rank; see the module docstring."""

    def __init__(
        self,
        *,
        planner: Planner,
        filters: FilterSettings,
        layout: dict[str, Any],
        num_workers: int,
        prefetch_batches: int,
    ) -> None:
        self._planner, self._filters, self._layout = planner, filters, layout
        self._num_workers, self._prefetch = num_workers, prefetch_batches
        self._skip = 0
        self._state: dict[str, Any] = {"position": planner.position.to_dict(), "batches_done": 0}
        self._counts: Counter[str] = Counter({f"dropped/{r.value}": 0 for r in DropReason})
        self._padded = self._slots = 0
        self._audio_seconds = 0.0
        self._wait = self._wait_total = 0.0
        self._started = self._closed = False
        self._planned: Iterator[PlannedBatch] | None = None
        self._queue: queue.Queue[Future[DecodedBatch] | _Failure] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position of the NEXT batch (small, JSON-serialisable); goes into every checkpoint."""
        return {"format": STATE_FORMAT, **self._state, "layout": dict(self._layout)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken. Call before the first `next()`."""
        if self._started:
            raise RuntimeError("load_state_dict() must be called before the first next()")
        if state.get("format") != STATE_FORMAT:
            raise UserError(
                f"data state format {state.get('format')!r} is not {STATE_FORMAT}; cannot resume the data stream"
            )
        saved = state.get("layout", {})
        order_keys = ("seed", "shuffle", "shuffle_block_rows", "shards")
        changed = [k for k in order_keys if saved.get(k) != self._layout[k]]
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {self._layout[k]!r}" for k in changed)
            raise UserError(f"the data order changed since the checkpoint ({details}); it cannot be resumed exactly")
        position = Position.from_dict(state["position"])
        batches_done = int(state["batches_done"])
        batching = [k for k in self._layout if k not in order_keys and saved.get(k) != self._layout[k]]
        if batching and batches_done:
            log.warning(
                "data batching changed since the checkpoint (%s): resuming from the start of the current window, "
                "so up to %d batches' samples are seen again",
                ", ".join(batching),
                batches_done,
            )
            batches_done = 0
        self._planner.seek(position)
        self._skip = batches_done
        self._state = {"position": position.to_dict(), "batches_done": batches_done}

    # --- iteration -----------------------------------------------------------------------------------------
    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("the data stream is closed")
        if not self._started:
            self._start()
        began = time.perf_counter()
        with self._first_batch_progress():
            while True:
                item = self._take()
                self._absorb(item)
                if item.batch is not None:
                    break
        self._wait = time.perf_counter() - began
        self._wait_total += self._wait
        return item.batch

    def _first_batch_progress(self) -> AbstractContextManager[object]:
        """While the first batch is awaited (a remote source's first shards), a line every progress.INTERVAL_S."""
        if self._counts["batches"]:
            return nullcontext()
        start = self._planner.position.index

        def line(elapsed: float) -> str:
            rows = self._planner.position.index - start  # read while the planning thread moves it on
            return f"data: waiting for the first training batch, {rows:,} rows read so far ({format_seconds(elapsed)})"

        return Ticker(line, logger=log, name="progress first batch")

    def _start(self) -> None:
        self._started = True
        self._planned = self._planner.batches(skip=self._skip)
        if self._num_workers == 0:
            return
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._pool = ThreadPoolExecutor(self._num_workers, thread_name_prefix="data-decode")
        self._thread = threading.Thread(target=self._produce, name="data-plan", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        """Planning thread: plan batches in order and queue their decoding, at most `prefetch_batches` ahead."""
        assert self._planned is not None and self._queue is not None and self._pool is not None
        try:
            for planned in self._planned:
                future = self._pool.submit(decode_planned, planned, filters=self._filters)
                if not self._put(future):
                    return
        except BaseException as exc:  # handed to the consumer, who raises it with its traceback
            self._put(_Failure(exc))

    def _put(self, item: Future[DecodedBatch] | _Failure) -> bool:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _take(self) -> DecodedBatch:
        if self._queue is None:  # num_workers == 0: plan and decode right here
            assert self._planned is not None
            return decode_planned(next(self._planned), filters=self._filters)
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        return item.result()

    def _absorb(self, item: DecodedBatch) -> None:
        self._state = item.state_after
        self._counts.update({f"dropped/{reason}": n for reason, n in item.drops.items()})
        self._counts["decoded"] += item.decoded
        self._counts["resampled"] += item.resampled
        if item.batch is not None:
            padded, slots = item.batch.padding
            self._padded += padded
            self._slots += slots
            self._counts["samples"] += len(item.batch)
            self._counts["batches"] += 1
            self._audio_seconds += float(item.batch.audio_lengths.sum()) / SAMPLE_RATE

    def stats(self) -> dict[str, float]:
        """Counts since this stream was built (samples handed out, drops by reason, ...), padding and wait time."""
        return {
            "samples": self._counts["samples"],
            "batches": self._counts["batches"],
            "audio_seconds": self._audio_seconds,
            "decoded": self._counts["decoded"],
            "resampled": self._counts["resampled"],
            **{k: v for k, v in sorted(self._counts.items()) if k.startswith("dropped/")},
            "padding_fraction": self._padded / self._slots if self._slots else 0.0,
            "data_wait_s": self._wait,
            "data_wait_total_s": self._wait_total,
        }

    def close(self) -> None:
        """Stop the prefetch threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._queue is not None:
            while True:  # unblock the planning thread and cancel queued decodes
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, Future):
                    item.cancel()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._thread is None or not self._thread.is_alive():
            self._planner.close()  # the readers belong to the planning thread while it runs

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def filter_settings(data: DataConfig) -> FilterSettings:
    return FilterSettings(
        min_seconds=data.min_seconds,
        max_seconds=data.max_seconds,
        max_label_tokens=data.max_label_tokens,
        silence_rms=data.silence_rms,
    )


def build_train_stream(
    *,
    data: DataConfig,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    count_tokens: Callable[[str], int] | None = None,
) -> TrainStream:
    """The endless, resumable training stream of this rank (`count_tokens` enables the label-budget filter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not data.train:
        raise UserError("data.train lists no source")
    readers, normalizers = [], []
    for i, config in enumerate(data.train):
        label = f"train{i}"
        source = open_source(config, label=label)
        readers.append(
            SourceReader(source, index=i, seed=seed, block_rows=data.shuffle_block_rows, shuffle=data.shuffle)
        )
        normalizers.append(
            TextNormalizer(strip_patterns=config.strip_patterns, lowercase=config.lowercase, source=f"data.train[{i}]")
        )
    filters = filter_settings(data)
    planner = Planner(
        readers=readers,
        normalizers=normalizers,
        weights=[c.weight for c in data.train],
        filters=filters,
        count_tokens=count_tokens,
        seed=seed,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        bucket_batches=data.bucket_batches,
        shuffle=data.shuffle,
    )
    layout = {
        # what the order depends on: a change makes a saved position meaningless
        "seed": seed,
        "shuffle": data.shuffle,
        "shuffle_block_rows": data.shuffle_block_rows,
        "shards": [r.source.num_shards for r in readers],
        # what the batches depend on: a change restarts the current window
        "weights": [c.weight for c in data.train],
        "batch_size": batch_size,
        "bucket_batches": data.bucket_batches,
        "rank": rank,
        "world_size": world_size,
        "filters": [data.min_seconds, data.max_seconds, data.max_label_tokens],
    }
    return TrainStream(
        planner=planner,
        filters=filters,
        layout=layout,
        num_workers=data.num_workers,
        prefetch_batches=data.prefetch_batches,
    )
