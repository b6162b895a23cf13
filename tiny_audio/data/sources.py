"""Data sources: a Hub data set, local parquet/arrow shards or a local folder, streamed with `datasets`.

Only raw bytes are read: the stream is formatted as Arrow tables, so datasets never decodes audio (its decoder
needs torchcodec). A source is addressed shard by shard (`ds.shard(num_shards=n, index=k)`) and, inside a shard,
by row (`.skip(row)`), which is what lets a `SourceReader` restart exactly at a saved cursor.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import datasets
import fsspec
import pyarrow as pa

from tiny_audio.assets import resolve_asset
from tiny_audio.config import SourceConfig
from tiny_audio.data.order import Cursor, block_order, shard_order
from tiny_audio.errors import UserError
from tiny_audio.retry import RetryPolicy, retry_call

log = logging.getLogger(__name__)

READ_RETRY = RetryPolicy(attempts=5, initial_s=2.0, max_s=30.0)
"""How hard one read of a remote source is tried before its error is raised (transient network errors only)."""


def _is_transient(exc: BaseException) -> bool:
    """Network trouble worth another try: timeouts, dropped connections, 429 and 5xx answers."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status == 429 or status >= 500
    # httpx-style client errors (connect/read failures, timeouts) without importing a particular HTTP client
    return any(cls.__name__ in ("TransportError", "TimeoutException") for cls in type(exc).__mro__)


class ArrowBlock:
    """Consecutive rows of one shard, kept as Arrow arrays: a row's bytes become Python objects only when asked."""

    def __init__(
        self, table: pa.Table, *, label: str, shard: int, start_row: int, audio_column: str, text_column: str
    ) -> None:
        for column in (audio_column, text_column):
            if column not in table.column_names:
                raise UserError(
                    f"data source {label} has no column '{column}' (columns: {', '.join(table.column_names)})"
                )
        self.label, self.shard, self.start_row = label, shard, start_row
        audio = table.column(audio_column).combine_chunks()
        kind = audio.type
        self._bytes: pa.Array | None = None
        self._paths: pa.Array | None = None
        if pa.types.is_struct(kind):
            names = {kind.field(i).name for i in range(kind.num_fields)}
            self._bytes = audio.field("bytes") if "bytes" in names else None
            self._paths = audio.field("path") if "path" in names else None
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
            self._bytes = audio
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
            self._paths = audio
        if self._bytes is None and self._paths is None:
            raise UserError(f"column '{audio_column}' of data source {label} holds {kind}, not audio bytes or paths")
        self._text = table.column(text_column).combine_chunks()
        self._rows = table.num_rows

    def __len__(self) -> int:
        return self._rows

    def key(self, i: int) -> str:
        return f"{self.label}/{self.shard}/{self.start_row + i}"

    def text(self, i: int) -> Any:
        return self._text[i].as_py()

    def audio(self, i: int) -> bytes | None:
        """The row's audio bytes; read from its path when the row holds only a path. None when unavailable."""
        data = self._bytes[i].as_py() if self._bytes is not None else None
        if data:
            return data
        path = self._paths[i].as_py() if self._paths is not None else None
        if not path:
            return None
        try:
            with fsspec.open(path, "rb") as f:
                return f.read()
        except (OSError, ValueError):
            return None  # counted as unreadable by the caller


class RowRef:
    """One row of a block; cheap to make, so rows another rank takes are never materialised."""

    __slots__ = ("block", "i")

    def __init__(self, block: ArrowBlock, i: int) -> None:
        self.block, self.i = block, i

    @property
    def key(self) -> str:
        return self.block.key(self.i)

    def text(self) -> Any:
        return self.block.text(self.i)

    def audio(self) -> bytes | None:
        return self.block.audio(self.i)


class ShardedSource:
    """A streaming data set addressed by (shard, row): `blocks(shard, start_row, n)` reads n rows at a time."""

    def __init__(
        self, dataset: datasets.IterableDataset, *, label: str, audio_column: str, text_column: str, remote: bool
    ) -> None:
        self._dataset = dataset
        self.label = label
        self.audio_column, self.text_column = audio_column, text_column
        self.remote = remote
        self.num_shards = int(dataset.num_shards)

    def _open(self, shard: int, start_row: int, block_rows: int) -> Iterator[pa.Table]:
        ds = self._dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        if start_row:
            ds = ds.skip(start_row)  # whole Arrow tables are skipped; no row is converted, no audio decoded
        return iter(ds.with_format("arrow").iter(batch_size=block_rows))

    def blocks(self, shard: int, start_row: int, block_rows: int) -> Iterator[ArrowBlock]:
        """Blocks of `block_rows` rows of one shard from `start_row` on (the last may be shorter).

        A remote read that fails for a while is retried (READ_RETRY), reopening the shard at the first row not
        yet handed out.
        """
        row = start_row
        tables: Iterator[pa.Table] | None = None

        def next_table() -> pa.Table | None:
            nonlocal tables
            try:
                if tables is None:
                    tables = self._open(shard, row, block_rows)
                return next(tables, None)
            except Exception:
                tables = None
                raise

        while True:
            if self.remote:
                what = f"reading {self.label} shard {shard} at row {row}"
                table = retry_call(next_table, what=what, policy=READ_RETRY, is_transient=_is_transient, logger=log)
            else:
                table = next_table()
            if table is None:
                return
            block = ArrowBlock(
                table,
                label=self.label,
                shard=shard,
                start_row=row,
                audio_column=self.audio_column,
                text_column=self.text_column,
            )
            row += len(block)
            yield block


def _is_local(path: str, data_files: list[str] | None) -> bool:
    if os.path.isdir(path):
        return True
    files = data_files or []
    return bool(files) and path in _PACKAGED_BUILDERS and all("://" not in f for f in files)


_PACKAGED_BUILDERS = {"parquet", "arrow", "csv", "json", "text", "audiofolder", "webdataset"}


def describe(config: SourceConfig) -> str:
    parts = [config.path, *([config.name] if config.name else []), config.split]
    if config.data_files:
        parts.append(f"data_files={config.data_files}")
    return ":".join(parts)


def open_source(config: SourceConfig, *, label: str) -> ShardedSource:
    """Open one configured source for streaming (resolves its files; reads no data yet)."""
    data_files = [resolve_asset(f) for f in config.data_files] if config.data_files else None
    remote = not _is_local(config.path, data_files)

    def load() -> datasets.IterableDataset:
        return datasets.load_dataset(
            config.path,
            name=config.name,
            split=config.split,
            data_files=data_files,
            revision=config.revision,
            streaming=True,
        )

    try:
        if remote:
            what = f"opening data source {label}"
            ds = retry_call(load, what=what, policy=READ_RETRY, is_transient=_is_transient, logger=log)
        else:
            ds = load()
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"data source {label} ({describe(config)}) cannot be opened: {exc}") from None
    if not isinstance(ds, datasets.IterableDataset):
        raise UserError(f"data source {label} ({describe(config)}) did not open as a stream (give a split)")
    features = ds.features
    if features is not None:
        missing = [c for c in (config.audio_column, config.text_column) if c not in features]
        if missing:
            raise UserError(
                f"data source {label} ({describe(config)}) has no column {', '.join(repr(m) for m in missing)} "
                f"(columns: {', '.join(features)}); set audio_column / text_column"
            )
        ds = ds.select_columns([config.audio_column, config.text_column])
    return ShardedSource(
        ds, label=label, audio_column=config.audio_column, text_column=config.text_column, remote=remote
    )


class SourceReader:
    """One source as an endless, seeded, resumable sequence of rows: epochs of shuffled shards of shuffled blocks.

    `cursor` says where it stands; a reader built with a saved cursor hands out exactly the rows the original
    would have handed out next, after reading (not decoding) only the block the cursor is in.
    """

    def __init__(
        self,
        source: ShardedSource,
        *,
        index: int,
        seed: int,
        block_rows: int,
        shuffle: bool,
        cursor: Cursor | None = None,
    ) -> None:
        self.source = source
        self._index, self._seed, self._block_rows, self._shuffle = index, seed, block_rows, shuffle
        self._cursor = Cursor()
        self._order: tuple[int, list[int]] | None = None
        self._blocks: Iterator[ArrowBlock] | None = None
        self._block: ArrowBlock | None = None
        self._perm: list[int] = []
        self._offset = 0
        self._next_block = 0
        self._skip = 0
        self._epoch_is_whole = True  # this epoch was read from its first row (so an empty one means no data)
        self._epoch_rows = 0
        self.seek(cursor or Cursor())

    @property
    def cursor(self) -> Cursor:
        return self._cursor.copy()

    def seek(self, cursor: Cursor) -> None:
        if cursor.shard >= self.source.num_shards:
            raise ValueError(
                f"cursor {cursor.to_list()} points past the {self.source.num_shards} shards of {self.source.label}"
            )
        self.close()
        self._cursor = cursor.copy()
        self._epoch_is_whole = cursor.shard == 0 and cursor.row == 0
        self._epoch_rows = 0

    def close(self) -> None:
        if self._blocks is not None:
            self._blocks.close()  # type: ignore[attr-defined]
        self._blocks, self._block, self._perm, self._offset = None, None, [], 0

    def _shard_id(self) -> int:
        epoch = self._cursor.epoch
        if self._order is None or self._order[0] != epoch:
            order = shard_order(
                seed=self._seed,
                source=self._index,
                epoch=epoch,
                num_shards=self.source.num_shards,
                shuffle=self._shuffle,
            )
            self._order = (epoch, order)
        return self._order[1][self._cursor.shard]

    def next(self) -> RowRef:
        """The next row (the cursor moves past it)."""
        while self._block is None or self._offset >= len(self._perm):
            self._load_block()
        ref = RowRef(self._block, self._perm[self._offset])
        self._offset += 1
        self._cursor.row += 1
        self._epoch_rows += 1
        return ref

    def _load_block(self) -> None:
        cursor, shard = self._cursor, self._shard_id()
        if self._blocks is None:
            start = cursor.row - cursor.row % self._block_rows
            self._skip = cursor.row - start  # rows of the first block already handed out before a resume
            self._next_block = start // self._block_rows
            self._blocks = self.source.blocks(shard, start, self._block_rows)
        block = next(self._blocks, None)
        if block is None:  # shard done: on to the next one, and to the next epoch after the last
            self.close()
            cursor.shard, cursor.row = cursor.shard + 1, 0
            if cursor.shard == self.source.num_shards:
                if self._epoch_is_whole and self._epoch_rows == 0:
                    raise UserError(f"data source {self.source.label} has no rows")
                cursor.epoch, cursor.shard = cursor.epoch + 1, 0
                self._epoch_is_whole, self._epoch_rows = True, 0
            return
        self._block = block
        self._perm = block_order(
            seed=self._seed,
            source=self._index,
            epoch=cursor.epoch,
            shard=shard,
            block=self._next_block,
            rows=len(block),
            shuffle=self._shuffle,
        )
        self._next_block += 1
        self._offset, self._skip = self._skip, 0
