"""The whole pipeline streaming local parquet shards: interleaving, filters, ranks, bucketing, eval, state checks."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_fixtures import (
    FORMATS,
    Row,
    clip,
    digest,
    encode,
    good_rows,
    row_keys,
    source,
    tone,
    write_shards,
)

from tiny_audio.config import DataConfig
from tiny_audio.data import Batch, DropReason, TrainStream, build_eval_set, build_train_stream
from tiny_audio.data.eval import priority
from tiny_audio.errors import UserError


def words(text: str) -> int:
    return len(text.split())


def take(stream: TrainStream, n: int) -> list[Batch]:
    return [next(stream) for _ in range(n)]


def config(train: list[dict[str, Any]], **overrides: Any) -> DataConfig:
    return DataConfig.model_validate(
        {"train": train, "eval": None, "num_workers": 2, "prefetch_batches": 3, **overrides}
    )


def test_sources_are_interleaved_by_weight(tmp_path: Path) -> None:
    a = write_shards(tmp_path / "a", good_rows(40, seconds=(0.3, 0.4), seed=1), prefix="a", rows_per_shard=10)
    b = write_shards(tmp_path / "b", good_rows(40, seconds=(0.3, 0.4), seed=2), prefix="b", rows_per_shard=10)
    data = config([source(a, weight=3.0), source(b, weight=1.0)], shuffle_block_rows=8, bucket_batches=4)
    with build_train_stream(data=data, batch_size=8, seed=0) as stream:
        keys = [k for batch in take(stream, 60) for k in batch.keys]
    share = Counter(k.split("/")[0] for k in keys)["train0"] / len(keys)
    assert len(keys) == 480
    assert abs(share - 0.75) < 0.06, share


def bad_rows() -> tuple[list[Row], dict[str, list[int]]]:
    """Good clips (some at 8 / 44.1 kHz, one stereo) with one or two bad rows of every kind in between."""
    rows = good_rows(22, seconds=(0.5, 2.0), seed=7, tag="g")
    rows[3] = Row(clip(1.1, seed=99, fmt=FORMATS[4], channels=2), "g 3 stereo clip", 1.1)
    nan = tone(1.0)
    nan[100:200] = np.nan
    bad = {
        "unreadable": [Row(b"definitely not audio" * 40, "corrupt bytes"), Row(None, "no bytes at all")],
        "nan": [Row(encode(nan, rate=16_000, subtype="FLOAT"), "nan inside")],
        "silence": [Row(encode(np.zeros(16_000, np.float32), rate=16_000), "only silence")],
        "too_long": [Row(clip(3.5, seed=5), "too long a clip")],
        "too_short": [Row(clip(0.1, seed=6), "too short a clip")],
        "empty_text": [Row(clip(1.0, seed=8), ""), Row(clip(1.0, seed=9), " <unk> [noise] ")],
        "too_many_tokens": [Row(clip(1.0, seed=10), "one two three four five six seven eight nine")],
    }
    positions: dict[str, list[int]] = {}
    out = list(rows)
    at = 1
    for reason, extra in bad.items():  # spread them out, never at the end (the last row is a good one)
        for row in extra:
            out.insert(at, row)
            positions.setdefault(reason, []).append(at)
            at += 3
    return out, positions


def test_bad_samples_are_dropped_and_counted_while_iteration_goes_on(tmp_path: Path) -> None:
    rows, positions = bad_rows()
    files = write_shards(tmp_path, rows, rows_per_shard=13, row_group_size=5)
    keys = row_keys("train0", len(rows), rows_per_shard=13)
    bad_keys = {keys[i] for where in positions.values() for i in where}
    good_keys = [k for k in keys if k not in bad_keys]
    # 22 good + nan + silence pass the plan-time checks: 24 = 3 windows of 2 batches of 4, exactly one epoch
    data = config([source(files)], shuffle=False, bucket_batches=2, max_seconds=3.0, max_label_tokens=8)
    with build_train_stream(data=data, batch_size=4, seed=0, count_tokens=words) as stream:
        epoch = take(stream, 6)
        stats = stream.stats()
        more = take(stream, 8)  # and on through the next epoch
    seen = [k for b in epoch for k in b.keys]
    assert sorted(seen) == sorted(good_keys)
    assert not bad_keys & {k for b in more for k in b.keys}
    assert stats["samples"] == 22 and stats["batches"] == 6
    expected = {f"dropped/{reason}": len(where) for reason, where in positions.items()}
    assert {k: v for k, v in stats.items() if k.startswith("dropped/")} == expected
    assert set(expected) == {f"dropped/{r.value}" for r in DropReason}
    resampled = sum(1 for i in range(22) if FORMATS[i % len(FORMATS)][2] != 16_000 or i == 3)
    assert stats["resampled"] == resampled
    stereo_key = keys[next(i for i, r in enumerate(rows) if r.text == "g 3 stereo clip")]
    stereo = next(b for b in epoch if stereo_key in b.keys)
    assert int(stereo.audio_lengths[stereo.keys.index(stereo_key)]) == pytest.approx(1.1 * 16_000, abs=2)
    assert all(b.audio.dtype.is_floating_point and b.audio.ndim == 2 for b in epoch)


def test_two_ranks_see_disjoint_samples_that_cover_the_set(tmp_path: Path) -> None:
    files = write_shards(tmp_path, good_rows(64, seconds=(0.3, 1.0), seed=3), rows_per_shard=16)
    data = config([source(files)], shuffle_block_rows=8, bucket_batches=2)
    per_rank = []
    for rank in (0, 1):
        with build_train_stream(data=data, batch_size=4, seed=5, rank=rank, world_size=2) as stream:
            per_rank.append([k for b in take(stream, 8) for k in b.keys])  # 32 each: one epoch between them
    assert len(per_rank[0]) == len(set(per_rank[0])) == 32
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(row_keys("train0", 64, rows_per_shard=16))


def test_bucketing_cuts_padding_far_below_random_batches(tmp_path: Path) -> None:
    files = write_shards(tmp_path, good_rows(64, seconds=(0.5, 6.0), seed=4), rows_per_shard=32)
    fractions = {}
    for buckets in (1, 8):
        data = config([source(files)], bucket_batches=buckets, shuffle_block_rows=64)
        with build_train_stream(data=data, batch_size=8, seed=1) as stream:
            take(stream, 8)
            fractions[buckets] = stream.stats()["padding_fraction"]
    assert fractions[1] > 0.25
    assert fractions[8] < fractions[1] / 3, fractions


def test_threads_change_nothing_but_speed(tmp_path: Path) -> None:
    files = write_shards(tmp_path, good_rows(40, seed=6), rows_per_shard=9, row_group_size=4)
    outputs = []
    for workers in (0, 3):
        data = config([source(files)], num_workers=workers, prefetch_batches=2, shuffle_block_rows=5, bucket_batches=3)
        with build_train_stream(data=data, batch_size=3, seed=2) as stream:
            outputs.append([digest(b) for b in take(stream, 20)])
            stats = stream.stats()
    assert outputs[0] == outputs[1]
    assert stats["data_wait_s"] >= 0 and stats["samples"] == 60


def test_state_is_small_json_and_guards_against_misuse(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = write_shards(tmp_path, good_rows(20, seed=8), rows_per_shard=10)
    data = config([source(files)], bucket_batches=3)
    with build_train_stream(data=data, batch_size=2, seed=9) as stream:
        take(stream, 4)
        state = stream.state_dict()
        with pytest.raises(RuntimeError, match="before the first next"):
            stream.load_state_dict(state)
    assert json.loads(json.dumps(state)) == state and len(json.dumps(state)) < 1000
    assert state["batches_done"] == 1  # 4 batches = one window of 3 + one batch of the next
    with pytest.raises(UserError, match="seed"):
        build_train_stream(data=data, batch_size=2, seed=10).load_state_dict(state)
    with build_train_stream(data=data, batch_size=3, seed=9) as other, caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
        assert other.state_dict()["batches_done"] == 0
    assert "start of the current window" in caplog.text


def test_the_eval_set_is_a_seeded_sample_of_the_whole_split(tmp_path: Path) -> None:
    rows, positions = bad_rows()
    files = write_shards(tmp_path, rows, prefix="eval", rows_per_shard=10)  # shards of 10, 10 and 2 rows
    keys = row_keys("eval", len(rows), rows_per_shard=10)
    bad = {keys[i] for where in positions.values() for i in where}
    valid = [k for k in keys if k not in bad]
    data = DataConfig.model_validate(
        {
            "train": [source(files)],
            "eval": source(files),
            "eval_samples": 9,
            "eval_wer_samples": 4,
            "max_seconds": 3.0,
            "max_label_tokens": 8,
        }
    )
    eval_set = build_eval_set(data=data, batch_size=4, count_tokens=words)
    got = [k for b in eval_set.batches for k in b.keys]
    # the 9 valid rows of lowest priority, from anywhere in the split (not its first rows)
    expected = sorted(valid, key=lambda k: priority(0, k))[:9]
    assert sorted(got) == sorted(expected)
    assert sorted(expected) != sorted(valid[:9])
    # the WER subset is the first 4 of them in priority order, batched apart from the rest
    assert eval_set.transcribed == 1 and sorted(eval_set.batches[0].keys) == sorted(expected[:4])
    assert [len(b) for b in eval_set.batches] == [4, 4, 1]
    for batch in eval_set.batches:  # formed by duration within each group
        assert batch.audio_lengths.tolist() == sorted(batch.audio_lengths.tolist())
    again = build_eval_set(data=data, batch_size=4, count_tokens=words)
    assert [digest(b) for b in again.batches] == [digest(b) for b in eval_set.batches]
    other = build_eval_set(data=data.model_copy(update={"eval_seed": 1}), batch_size=4, count_tokens=words)
    assert {k for b in other.batches for k in b.keys} != set(got)

    halves = [build_eval_set(data=data, batch_size=4, count_tokens=words, rank=r, world_size=2) for r in (0, 1)]
    assert [len(h.batches) for h in halves] == [2, 1] and [h.transcribed for h in halves] == [1, 0]
    assert not build_eval_set(data=data.model_copy(update={"eval": None}), batch_size=4)
    many = data.model_copy(update={"eval_samples": 500})
    assert build_eval_set(data=many, batch_size=8, count_tokens=words).samples == 22


def test_a_capped_eval_scan_still_reads_every_shard(tmp_path: Path) -> None:
    files = write_shards(tmp_path, good_rows(30, seconds=(0.3, 0.6), seed=3), prefix="eval", rows_per_shard=10)
    data = DataConfig.model_validate(
        {
            "train": [source(files)],
            "eval": source(files),
            "eval_samples": 6,
            "eval_scan_rows": 12,
            "shuffle_block_rows": 4,
        }
    )
    got = [k for b in build_eval_set(data=data, batch_size=8).batches for k in b.keys]
    assert len(got) == 6
    assert {k.split("/")[1] for k in got} <= {"0", "1", "2"}
    scanned = row_keys("eval", 30, rows_per_shard=10)
    read = [k for k in scanned if int(k.split("/")[2]) < 4]  # one block of 4 rows from each of the 3 shards
    assert set(got) <= set(read)
    assert got and sorted(got) == sorted(sorted(read, key=lambda k: priority(0, k))[:6])
