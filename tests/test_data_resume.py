"""Exact resume with shuffling on: stop after k batches, restore the state in another process, compare batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import Row, clip, digest, good_rows, source, write_shards

from tiny_audio.config import DataConfig
from tiny_audio.data import build_train_stream
from tiny_audio.data.sources import ShardedSource

BATCH, AFTER = 3, 4  # batch size; batches compared after each resume point
FIXTURES = Path(__file__).with_name("data_fixtures.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """Two shuffled sources (33 and 18 rows, blocks of 4 inside shards of 11 and 9), one unreadable row."""
    root = tmp_path_factory.mktemp("resume")
    a_rows = good_rows(33, seed=11, tag="a")
    a_rows[7] = Row(clip(0.05, seed=1), "a 7 too short")
    a_rows[20] = Row(b"corrupt" * 30, "a 20 unreadable")
    a = write_shards(root / "a", a_rows, prefix="a", rows_per_shard=11, row_group_size=3)
    b = write_shards(root / "b", good_rows(18, seed=12, tag="b"), prefix="b", rows_per_shard=9, row_group_size=4)
    return DataConfig.model_validate(
        {
            "train": [source(a, weight=2.0), source(b, weight=1.0)],
            "eval": None,
            "shuffle": True,
            "shuffle_block_rows": 4,
            "bucket_batches": 3,
            "num_workers": 2,
            "prefetch_batches": 4,
        }
    )


def reference(data: DataConfig, batches: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """An uninterrupted run: each batch's digest and the state before it."""
    digests, states = [], []
    with build_train_stream(data=data, batch_size=BATCH, seed=42) as stream:
        for _ in range(batches):
            states.append(stream.state_dict())
            digests.append(digest(next(stream)))
    return digests, states


def stop_after(data: DataConfig, k: int) -> dict[str, Any]:
    """A run interrupted after k batches (with decodes still in flight); its saved state."""
    stream = build_train_stream(data=data, batch_size=BATCH, seed=42)
    for _ in range(k):
        next(stream)
    state = stream.state_dict()
    stream.close()
    return json.loads(json.dumps(state))  # what a checkpoint file would hold


def epochs(state: dict[str, Any]) -> list[int]:
    return [cursor[0] for cursor in state["position"]["sources"]]


def test_resume_in_another_process_yields_exactly_the_uninterrupted_batches(data: DataConfig, tmp_path: Path) -> None:
    digests, states = reference(data, 44)
    assert len({k for d in digests for k in d["keys"]}) == 33 + 18 - 2  # two full epochs of a and b in there
    # resume points: the start, inside a window, inside a block, just before and just after an epoch boundary
    inside_window = next(k for k in range(1, 40) if states[k]["batches_done"] == 2)
    inside_block = next(
        k for k in range(1, 40) if any(c[2] % 4 for c in states[k]["position"]["sources"]) and k != inside_window
    )
    crossing = next(k for k in range(40) if epochs(states[k])[0] == 0 and epochs(states[k + AFTER])[0] >= 1)
    after = next(k for k in range(40) if epochs(states[k])[0] >= 1)
    points = sorted({0, inside_window, inside_block, crossing, after})
    assert len(points) == 5, points

    saved = [stop_after(data, k) for k in points]
    for k, state in zip(points, saved, strict=True):
        assert state == states[k], f"state after {k} batches depends on how the run was stopped"

    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"data": data.model_dump(mode="json"), "batch_size": BATCH, "seed": 42, "states": saved, "batches": AFTER}
        )
    )
    child = subprocess.run(
        [sys.executable, str(FIXTURES), "resume", str(spec)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    resumed = json.loads(child.stdout.strip().splitlines()[-1])
    for k, got in zip(points, resumed, strict=True):
        assert got == digests[k : k + AFTER], f"resume after {k} batches differs"


def test_fast_forward_decodes_no_skipped_audio_and_replays_nothing(
    data: DataConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    inline = data.model_copy(update={"num_workers": 0})
    digests, states = reference(inline, 30)
    k = next(k for k in range(25, 30) if states[k]["batches_done"] == 2)  # two batches of the window done

    rows_read = []
    original = ShardedSource.blocks

    def counting_blocks(self: ShardedSource, shard: int, start_row: int, block_rows: int):  # type: ignore[no-untyped-def]
        for block in original(self, shard, start_row, block_rows):
            rows_read.append(len(block))
            yield block

    monkeypatch.setattr(ShardedSource, "blocks", counting_blocks)
    with build_train_stream(data=inline, batch_size=BATCH, seed=42) as stream:
        stream.load_state_dict(states[k])
        batch = next(stream)
        stats = stream.stats()
    assert digest(batch) == digests[k]
    assert stats["decoded"] == len(batch) == BATCH  # only the batch handed out was decoded
    consumed_before = sum(len(d["keys"]) for d in digests[:k])
    assert sum(rows_read) < consumed_before / 2, "resume re-read the stream from its start"
