"""The held-out set: a seeded sample of `data.eval`, drawn once over the whole split and fixed for the run.

Rows are read round-robin over the split's shards (a block from each in turn), so even a capped read
(`data.eval_scan_rows`) covers every shard; corpora are often stored one sub-corpus after another, and the first
rows of a split would measure one of them. Each row gets a priority from a hash of (`data.eval_seed`, its key);
the `eval_samples` valid rows of lowest priority are kept: a uniform sample, over lengths too, that depends
only on the data and the seed. The first `eval_wer_samples` of them in priority order (a random subset) are the
ones transcribed for WER.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tiny_audio.config import DataConfig
from tiny_audio.data.batching import Batch, bucket, collate
from tiny_audio.data.filters import TextNormalizer
from tiny_audio.data.pipeline import filter_settings
from tiny_audio.data.samples import Candidate, Ready, admit, finish
from tiny_audio.data.sources import RowRef, ShardedSource, open_source
from tiny_audio.progress import Ticker, format_seconds

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """Fixed eval batches: the first `transcribed` are the WER subset, the rest are scored for loss only."""

    batches: list[Batch] = field(default_factory=list)
    transcribed: int = 0

    def __bool__(self) -> bool:
        return bool(self.batches)

    @property
    def samples(self) -> int:
        return sum(len(b) for b in self.batches)


def priority(seed: int, key: str) -> int:
    """A row's place in the seeded sample: the lowest priorities are kept."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "big")


def build_eval_set(
    *,
    data: DataConfig,
    batch_size: int,
    count_tokens: Callable[[str], int] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> EvalSet:
    """The same eval batches at every evaluation; an empty set when `data.eval` is None.

    Batches are formed by duration within the WER subset and within the rest. With several processes, rank r
    keeps batches r, r + world_size, ... of each group.
    """
    config = data.eval
    if config is None:
        return EvalSet()
    source = open_source(config, label="eval")
    normalize = TextNormalizer(strip_patterns=config.strip_patterns, lowercase=config.lowercase, source="data.eval")
    filters = filter_settings(data)
    wanted = data.eval_samples
    pool = wanted + max(16, wanted // 10)  # room for samples that fail only once decoded

    def admit_row(row: RowRef) -> Candidate | None:
        outcome = admit(row, index=0, normalize=normalize, filters=filters, count_tokens=count_tokens)
        return outcome if isinstance(outcome, Candidate) else None

    candidates, scanned, shards_read = _lowest_priority(
        source,
        admit_row=admit_row,
        pool=pool,
        seed=data.eval_seed,
        scan_rows=data.eval_scan_rows,
        block_rows=data.shuffle_block_rows,
    )
    with ThreadPoolExecutor(max(data.num_workers, 1), thread_name_prefix="eval-decode") as threads:
        results = list(threads.map(lambda c: finish(c, filters=filters), candidates))
    kept = [(c, r) for c, r in zip(candidates, results, strict=True) if isinstance(r, Ready)][:wanted]
    dropped = Counter(r.value for r in results if not isinstance(r, Ready))
    if len(kept) < wanted:
        log.warning("data.eval holds only %d valid samples (eval_samples is %d)", len(kept), wanted)
    hours = sum(c.seconds for c, _ in kept) / 3600
    log.info(
        "eval set: %d samples (%.1f h) drawn from %d rows of %d/%d shards (seed %d); WER on %d of them%s",
        len(kept),
        hours,
        scanned,
        shards_read,
        source.num_shards,
        data.eval_seed,
        min(data.eval_wer_samples, len(kept)),
        f"; dropped at decode: {dict(dropped)}" if dropped else "",
    )
    transcribed = _batches(kept[: data.eval_wer_samples], batch_size)[rank::world_size]
    rest = _batches(kept[data.eval_wer_samples :], batch_size)[rank::world_size]
    return EvalSet(batches=transcribed + rest, transcribed=len(transcribed))


def _lowest_priority(
    source: ShardedSource,
    *,
    admit_row: Callable[[RowRef], Candidate | None],
    pool: int,
    seed: int,
    scan_rows: int,
    block_rows: int,
) -> tuple[list[Candidate], int, int]:
    """The `pool` admitted rows of lowest priority among the first `scan_rows` read round-robin over the shards;
    (candidates in priority order, rows read, shards read)."""
    shards = {shard: source.blocks(shard, 0, block_rows) for shard in range(source.num_shards)}
    heap: list[tuple[int, str, Candidate]] = []  # max-heap on priority (negated): the pool's worst on top
    scanned, touched = 0, set()

    def progress(elapsed: float) -> str:  # read by a thread while the loop below runs (a remote split takes long)
        return (
            f"eval set: {scanned:,} rows read from {len(touched)}/{source.num_shards} shards so far "
            f"({format_seconds(elapsed)})"
        )

    ticker = Ticker(progress, logger=log, name="progress eval set").start()
    try:
        while shards and scanned < scan_rows:
            for shard in list(shards):
                block = next(shards[shard], None)
                if block is None:
                    del shards[shard]
                    continue
                touched.add(shard)
                for i in range(min(len(block), scan_rows - scanned)):
                    row = RowRef(block, i)
                    rank = priority(seed, row.key)
                    scanned += 1
                    if len(heap) == pool and rank >= -heap[0][0]:
                        continue  # could not enter the sample: not even its header is read
                    candidate = admit_row(row)
                    if candidate is not None:
                        heapq.heappush(heap, (-rank, row.key, candidate))
                        if len(heap) > pool:
                            heapq.heappop(heap)
                if scanned >= scan_rows:
                    break
    finally:
        ticker.stop()
        for blocks in shards.values():
            blocks.close()
    ordered = sorted(heap, key=lambda item: (-item[0], item[1]))
    return [candidate for _, _, candidate in ordered], scanned, len(touched)


def _batches(kept: list[tuple[Candidate, Ready]], batch_size: int) -> list[Batch]:
    groups = bucket([c.seconds for c, _ in kept], batch_size=batch_size, rng=None)
    return [
        collate(
            [kept[j][1].wave for j in group],
            texts=[kept[j][1].text for j in group],
            keys=[kept[j][1].key for j in group],
        )
        for group in groups
    ]
