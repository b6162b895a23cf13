"""The held-out set: the first `eval_samples` valid samples of `data.eval`, in file order, batched by duration."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tiny_audio.config import DataConfig
from tiny_audio.data.batching import Batch, bucket, collate
from tiny_audio.data.filters import TextNormalizer
from tiny_audio.data.pipeline import filter_settings
from tiny_audio.data.samples import Candidate, Ready, admit, finish
from tiny_audio.data.sources import SourceReader, open_source

log = logging.getLogger(__name__)


def build_eval_batches(
    *,
    data: DataConfig,
    batch_size: int,
    count_tokens: Callable[[str], int] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[Batch]:
    """The same fixed eval batches at every evaluation (no shuffle), shortest first; [] when `data.eval` is None.

    With several processes, rank r keeps batches r, r + world_size, ... of the shared list.
    """
    config = data.eval
    if config is None:
        return []
    filters = filter_settings(data)
    normalize = TextNormalizer(strip_patterns=config.strip_patterns, lowercase=config.lowercase, source="data.eval")
    reader = SourceReader(
        open_source(config, label="eval"), index=0, seed=0, block_rows=data.shuffle_block_rows, shuffle=False
    )
    wanted = data.eval_samples
    chunk = max(batch_size, 1) * 4
    kept: list[tuple[Candidate, Ready]] = []
    position = 0
    with ThreadPoolExecutor(max(data.num_workers, 1), thread_name_prefix="eval-decode") as pool:
        exhausted = False
        while len(kept) < wanted and not exhausted:
            pending: list[Candidate] = []
            while len(pending) < chunk:
                row = reader.next()
                if reader.cursor.epoch > 0:  # wrapped around: the whole split has been read
                    exhausted = True
                    break
                outcome = admit(row, index=position, normalize=normalize, filters=filters, count_tokens=count_tokens)
                position += 1
                if isinstance(outcome, Candidate):
                    pending.append(outcome)
            for candidate, result in zip(pending, pool.map(lambda c: finish(c, filters=filters), pending), strict=True):
                if isinstance(result, Ready) and len(kept) < wanted:
                    kept.append((candidate, result))
    reader.close()
    if len(kept) < wanted:
        log.warning("data.eval holds only %d valid samples (eval_samples is %d)", len(kept), wanted)
    groups = bucket([c.seconds for c, _ in kept], batch_size=batch_size, rng=None)
    batches = [
        collate(
            [kept[j][1].wave for j in group],
            texts=[kept[j][1].text for j in group],
            keys=[kept[j][1].key for j in group],
        )
        for group in groups
    ]
    return batches[rank::world_size]
