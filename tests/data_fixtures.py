"""Tiny local parquet shards for the data-pipeline tests, and a child-process entry point for the resume test.

Audio is generated here (tones plus a little noise, written with soundfile) in the formats and sample rates
real shards hold, with the `audio` column as `{bytes, path}` and the Hub's Audio feature in the schema metadata
(so datasets would decode it, were the pipeline to let it).

    python tests/data_fixtures.py resume SPEC.json   # restore each state in a fresh pipeline, print the batches
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

# datasets sleeps 5 s whenever a shuffled stream of parquet files ends (an Arrow thread-shutdown workaround)
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

_AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_HF_METADATA = {
    b"huggingface": json.dumps(
        {"info": {"features": {"audio": {"_type": "Audio"}, "text": {"dtype": "string", "_type": "Value"}}}}
    ).encode()
}

# (container, subtype, sample rate): what real corpora hold; the last two need resampling
FORMATS: tuple[tuple[str, str, int], ...] = (
    ("WAV", "PCM_16", 16_000),
    ("FLAC", "PCM_16", 16_000),
    ("OGG", "VORBIS", 16_000),
    ("WAV", "PCM_16", 8_000),
    ("FLAC", "PCM_24", 44_100),
)


def tone(seconds: float, *, rate: int = 16_000, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A tone with a little noise: clearly not silent, different for every seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t) + 0.02 * rng.standard_normal(t.shape)
    wave = wave.astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def encode(wave: np.ndarray, *, rate: int, container: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def clip(seconds: float, *, seed: int, fmt: tuple[str, str, int] = FORMATS[0], channels: int = 1) -> bytes:
    container, subtype, rate = fmt
    return encode(
        tone(seconds, rate=rate, seed=seed, channels=channels), rate=rate, container=container, subtype=subtype
    )


@dataclass
class Row:
    audio: bytes | None
    text: str
    seconds: float = 0.0
    """The clip's true length (for the tests' expectations)."""


def good_rows(count: int, *, seconds: tuple[float, float] = (0.4, 2.0), seed: int = 0, tag: str = "a") -> list[Row]:
    """Valid clips of varied length, format and rate; the text names the row (`a 7 ...`)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        length = round(float(rng.uniform(*seconds)), 3)
        fmt = FORMATS[i % len(FORMATS)]
        rows.append(Row(clip(length, seed=seed * 100_003 + i, fmt=fmt), f"{tag} {i} hello world", length))
    return rows


def write_shards(
    directory: Path,
    rows: Sequence[Row],
    *,
    prefix: str = "train",
    rows_per_shard: int,
    row_group_size: int | None = None,
) -> list[str]:
    """Write rows into `<prefix>-00000.parquet`, ... in order; return the file paths (shard order)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(rows), rows_per_shard)):
        part = rows[start : start + rows_per_shard]
        audio = pa.array(
            [{"bytes": r.audio, "path": f"{prefix}-{shard}-{i}.audio"} for i, r in enumerate(part)], type=_AUDIO_TYPE
        )
        table = pa.table({"audio": audio, "text": pa.array([r.text for r in part], pa.string())})
        path = directory / f"{prefix}-{shard:05d}.parquet"
        pq.write_table(table.replace_schema_metadata(_HF_METADATA), path, row_group_size=row_group_size or 1_000_000)
        paths.append(str(path))
    return paths


def row_keys(label: str, count: int, *, rows_per_shard: int) -> list[str]:
    """The pipeline's keys of rows written by `write_shards`, in the same order."""
    return [f"{label}/{i // rows_per_shard}/{i % rows_per_shard}" for i in range(count)]


def source(files: Sequence[str], **overrides: Any) -> dict[str, Any]:
    """A SourceConfig as a dict: local parquet shards."""
    return {"path": "parquet", "data_files": list(files), **overrides}


def digest(batch: Any) -> dict[str, Any]:
    """What identifies a batch exactly: keys, texts, lengths and the audio's bytes."""
    audio = batch.audio.numpy()
    return {
        "keys": list(batch.keys),
        "texts": list(batch.texts),
        "lengths": batch.audio_lengths.tolist(),
        "audio": hashlib.sha1(audio.tobytes()).hexdigest() + f":{audio.shape}",
    }


def _resume_child(spec_path: str) -> None:
    from tiny_audio.config import DataConfig
    from tiny_audio.data import build_train_stream

    spec = json.loads(Path(spec_path).read_text())
    data = DataConfig.model_validate(spec["data"])
    results = []
    for state in spec["states"]:
        stream = build_train_stream(data=data, batch_size=spec["batch_size"], seed=spec["seed"])
        stream.load_state_dict(state)
        try:
            results.append([digest(next(stream)) for _ in range(spec["batches"])])
        finally:
            stream.close()
    print(json.dumps(results))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "resume":
        _resume_child(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} resume SPEC.json")
