"""Speak sentences with espeak-ng and store them as parquet shards the data pipeline streams.

Shard contract (the one the streaming pipeline reads): columns `audio` = struct {bytes: binary, path: string}
holding a whole 16 kHz mono OGG file (Vorbis or Opus; `soundfile` reads both) and `text` = the transcript.
No Hugging Face feature metadata is written, so `datasets` leaves the audio undecoded.

Reproducible: each utterance's voice, speed, pitch and loudness are drawn from a seeded RNG, espeak-ng and the
OGG encoder are deterministic, so a rebuild decodes to the same samples (the OGG bytes differ, as libsndfile
gives each stream a random serial number).
"""

from __future__ import annotations

import io
import math
import random
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
# espeak-ng's English voices and voice variants that sound distinct and intelligible.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt4")
# Silence below this level at either end is cut, keeping a little margin, so clips are mostly speech.
TRIM_LEVEL = 1e-3
TRIM_MARGIN_S = 0.05

SCHEMA = pa.schema(
    [
        pa.field("audio", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("text", pa.string()),
    ]
)

Codec = Literal["VORBIS", "OPUS"]
# Each split plans its voices with seed + offset, so train and eval voices are drawn independently.
SPLIT_SEED_OFFSET = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class Utterance:
    """One sentence and how espeak-ng says it."""

    text: str
    voice: str
    speed: int
    """Words per minute."""
    pitch: int
    """0-99."""
    amplitude: int
    """espeak-ng loudness, 100 = default."""


def espeak_binary() -> str | None:
    """Path of the espeak-ng executable, or None when it is not installed."""
    return shutil.which("espeak-ng")


def plan(*, texts: Sequence[str], seed: int) -> list[Utterance]:
    """Give each text a seeded voice, speed, pitch and loudness (same inputs -> same plan)."""
    rng = random.Random(seed)
    return [
        Utterance(
            text=text,
            voice=f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}",
            speed=rng.randint(130, 210),
            pitch=rng.randint(25, 75),
            amplitude=rng.randint(60, 160),
        )
        for text in texts
    ]


def speak(utterance: Utterance) -> np.ndarray:
    """espeak-ng -> float32 mono samples at 16 kHz, leading/trailing silence trimmed. Shape (T,)."""
    binary = espeak_binary()
    if binary is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    u = utterance
    command = [binary, "--stdout", "-v", u.voice, "-s", str(u.speed), "-p", str(u.pitch), "-a", str(u.amplitude)]
    wav = subprocess.run([*command, u.text], capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    samples = soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32)
    voiced = np.flatnonzero(np.abs(samples) > TRIM_LEVEL)
    if voiced.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {u}")
    margin = int(TRIM_MARGIN_S * SAMPLE_RATE)
    return samples[max(0, voiced[0] - margin) : voiced[-1] + margin]


def encode(samples: np.ndarray, *, codec: Codec, compression_level: float) -> bytes:
    """16 kHz samples -> the bytes of an OGG file (compression_level 0..1: higher is smaller)."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="OGG", subtype=codec, compression_level=compression_level)
    return buffer.getvalue()


def synthesize(
    utterances: Sequence[Utterance], *, codec: Codec, compression_level: float, workers: int = 2
) -> list[bytes]:
    """Speak and encode every utterance (in order; espeak-ng runs in `workers` processes at a time)."""

    def one(utterance: Utterance) -> bytes:
        return encode(speak(utterance), codec=codec, compression_level=compression_level)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, utterances))


def write_shards(
    *, audio: Sequence[bytes], texts: Sequence[str], out_dir: Path, split: str, num_shards: int
) -> list[Path]:
    """Write rows as `{split}-{i:05d}-of-{n:05d}.parquet` (consecutive rows per shard); returns the paths."""
    if len(audio) != len(texts):
        raise ValueError(f"{len(audio)} audio clips but {len(texts)} texts")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{split}-*.parquet"):
        stale.unlink()
    per_shard = math.ceil(len(texts) / num_shards)
    paths = []
    for shard in range(num_shards):
        rows = range(shard * per_shard, min(len(texts), (shard + 1) * per_shard))
        table = pa.table(
            {
                "audio": [{"bytes": audio[i], "path": f"{split}-{i:06d}.ogg"} for i in rows],
                "text": [texts[i] for i in rows],
            },
            schema=SCHEMA,
        )
        path = out_dir / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
        # The audio is already compressed: parquet compression would only cost time.
        pq.write_table(table, path, compression="none", row_group_size=64)
        paths.append(path)
    return paths


def build_corpus(
    *,
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    out_dir: Path,
    seed: int,
    train_shards: int,
    codec: Codec,
    compression_level: float,
) -> dict[str, float]:
    """Speak the train and eval sentences and write their shards under `out_dir`; returns size/duration figures."""
    figures: dict[str, float] = {}
    for split, texts, shards in (("train", train_texts, train_shards), ("eval", eval_texts, 1)):
        utterances = plan(texts=texts, seed=seed + SPLIT_SEED_OFFSET[split])
        clips = synthesize(utterances, codec=codec, compression_level=compression_level)
        write_shards(audio=clips, texts=texts, out_dir=out_dir, split=split, num_shards=shards)
        figures[f"{split}_clips"] = len(clips)
        figures[f"{split}_seconds"] = sum(sf.info(io.BytesIO(c)).duration for c in clips)
    figures["megabytes"] = sum(p.stat().st_size for p in out_dir.glob("*.parquet")) / 1e6
    return figures


def read_shard(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """Decode a shard back to (samples per row, texts) — for tests and inspection."""
    table = pq.read_table(path)
    clips = [sf.read(io.BytesIO(a["bytes"]), dtype="float32")[0] for a in table.column("audio").to_pylist()]
    return clips, table.column("text").to_pylist()
