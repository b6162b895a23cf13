"""Sources through real `datasets` streaming of local shards: epochs, seeded shuffles, exact restart at a cursor."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from data_fixtures import good_rows, row_keys, source, write_shards

from tiny_audio.config import SourceConfig
from tiny_audio.data.order import Cursor
from tiny_audio.data.sources import SourceReader, open_source
from tiny_audio.errors import UserError

ROWS, PER_SHARD, BLOCK = 30, 11, 4  # shards of 11, 11 and 8 rows: blocks of 4 leave short last blocks


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    rows = good_rows(ROWS, seconds=(0.3, 0.5), seed=5)
    return write_shards(tmp_path_factory.mktemp("src"), rows, rows_per_shard=PER_SHARD, row_group_size=3)


def reader(files: list[str], *, shuffle: bool = True, seed: int = 3, cursor: Cursor | None = None) -> SourceReader:
    opened = open_source(SourceConfig.model_validate(source(files)), label="s")
    return SourceReader(opened, index=0, seed=seed, block_rows=BLOCK, shuffle=shuffle, cursor=cursor)


def test_each_epoch_hands_out_every_row_once_in_a_new_seeded_order(shards: list[str]) -> None:
    r = reader(shards)
    assert r.source.num_shards == 3
    epochs = [[r.next().key for _ in range(ROWS)] for _ in range(3)]
    expected = sorted(row_keys("s", ROWS, rows_per_shard=PER_SHARD))
    for keys in epochs:
        assert sorted(keys) == expected
    assert epochs[0] != epochs[1] != epochs[2]
    assert r.cursor.epoch == 2
    again = reader(shards)
    assert [again.next().key for _ in range(ROWS)] == epochs[0]
    other_seed = reader(shards, seed=4)
    assert [other_seed.next().key for _ in range(ROWS)] != epochs[0]


def test_shuffle_keeps_blocks_together_and_shards_whole(shards: list[str]) -> None:
    r = reader(shards)
    keys = [r.next().key for _ in range(ROWS)]
    shards_read = [k.split("/")[1] for k in keys]
    # a shard is read to its end before the next one starts
    assert sum(shards_read[i] != shards_read[i - 1] for i in range(1, ROWS)) == 2
    first_block = [int(k.split("/")[2]) for k in keys[:BLOCK]]
    assert sorted(first_block) == [0, 1, 2, 3] and first_block != [0, 1, 2, 3]  # the first block, permuted


def test_without_shuffle_rows_come_in_file_order(shards: list[str]) -> None:
    r = reader(shards, shuffle=False)
    expected = [*row_keys("s", ROWS, rows_per_shard=PER_SHARD), "s/0/0", "s/0/1"]
    assert [r.next().key for _ in range(ROWS + 2)] == expected


def test_a_reader_built_at_any_cursor_continues_exactly(shards: list[str]) -> None:
    opened = open_source(SourceConfig.model_validate(source(shards)), label="s")
    r = SourceReader(opened, index=0, seed=3, block_rows=BLOCK, shuffle=True)
    cursors, keys = [], []
    for _ in range(ROWS + 16):  # into the second epoch
        cursors.append(r.cursor)
        keys.append(r.next().key)
    for step in range(ROWS + 13):
        resumed = SourceReader(opened, index=0, seed=3, block_rows=BLOCK, shuffle=True, cursor=cursors[step])
        assert [resumed.next().key for _ in range(3)] == keys[step : step + 3], f"cursor {cursors[step]}"


def test_folder_arrow_and_plain_binary_sources(tmp_path: Path, shards: list[str]) -> None:
    folder = open_source(SourceConfig(path=str(Path(shards[0]).parent)), label="f")
    assert folder.num_shards == 3
    rows = good_rows(5, seed=9)
    table = pa.table({"wav": pa.array([r.audio for r in rows], pa.binary()), "sentence": [r.text for r in rows]})
    path = tmp_path / "x-00000.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    config = SourceConfig(path="arrow", data_files=[str(path)], audio_column="wav", text_column="sentence")
    r = SourceReader(open_source(config, label="x"), index=0, seed=0, block_rows=2, shuffle=False)
    first = r.next()
    assert first.key == "x/0/0" and first.text() == rows[0].text and first.audio() == rows[0].audio


def test_missing_files_and_columns_are_one_line_user_errors(tmp_path: Path, shards: list[str]) -> None:
    with pytest.raises(UserError, match="cannot be opened"):
        open_source(SourceConfig(path="parquet", data_files=[str(tmp_path / "none-*.parquet")]), label="train0")
    with pytest.raises(UserError, match="no column 'wav'"):
        open_source(SourceConfig(path="parquet", data_files=shards, audio_column="wav"), label="train0")
    with pytest.raises(UserError, match="Bad split"):
        open_source(SourceConfig(path="parquet", data_files=shards, split="dev"), label="eval")


def test_an_empty_source_is_an_error_not_a_hang(tmp_path: Path) -> None:
    empty = pa.table({"audio": pa.array([], pa.binary()), "text": pa.array([], pa.string())})
    path = tmp_path / "e.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, empty.schema) as writer:
        writer.write_table(empty)
    opened = open_source(SourceConfig(path="arrow", data_files=[str(path)]), label="e")
    r = SourceReader(opened, index=0, seed=0, block_rows=4, shuffle=True)
    with pytest.raises(UserError, match="no rows"):
        r.next()


def test_rows_are_spread_evenly_over_epochs(shards: list[str]) -> None:
    r = reader(shards)
    counts = Counter(r.next().key for _ in range(ROWS * 4))
    assert set(counts.values()) == {4}
