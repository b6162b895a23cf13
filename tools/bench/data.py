"""Data-pipeline throughput: samples/s and audio-seconds/s per CPU core, and padding, with and without bucketing.

    python -m tools.bench.data                 # a few hundred generated clips of 2-30 s
    python -m tools.bench.data --tiny          # the tiny experiment's shipped shards

Clips are streamed from local parquet shards through the real pipeline (datasets streaming, seeded shuffle,
header probe, soundfile decode, soxr resample, filters, bucketing, collation, prefetch threads). "Per core" is
per CPU-second the process spent (all threads), so it does not depend on how many cores the machine has.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# (container, subtype, rate): mostly 16 kHz FLAC like LoquaciousSet, some clips that need resampling
_FORMATS = (("FLAC", "PCM_16", 16_000),) * 3 + (("OGG", "VORBIS", 16_000), ("WAV", "PCM_16", 16_000))
_FORMATS += (("OGG", "VORBIS", 22_050), ("FLAC", "PCM_16", 44_100))
TINY_DATA = Path(__file__).resolve().parent.parent / "assets" / "tiny" / "data"


def generate_shards(directory: Path, *, clips: int, seed: int = 0, rows_per_shard: int = 50) -> list[str]:
    """`clips` clips of 2-30 s (noise-modulated tones, varied formats) in parquet shards; returns the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for i in range(clips):
        container, subtype, rate = _FORMATS[i % len(_FORMATS)]
        seconds = float(rng.uniform(2.0, 30.0))
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        wave = (wave + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)
        buffer = io.BytesIO()
        sf.write(buffer, wave, rate, format=container, subtype=subtype)
        rows.append({"audio": {"bytes": buffer.getvalue(), "path": f"{i}.{container.lower()}"}, "text": f"clip {i}"})
    files = []
    for shard, start in enumerate(range(0, clips, rows_per_shard)):
        path = directory / f"train-{shard:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[start : start + rows_per_shard]), path)
        files.append(str(path))
    return files


def measure(files: list[str], *, bucket_batches: int, batch_size: int, batches: int, workers: int) -> dict[str, float]:
    """Stream `batches` batches after one warm-up batch; throughput over the timed part."""
    from tiny_audio.config import DataConfig, SourceConfig
    from tiny_audio.data import build_train_stream

    data = DataConfig(
        train=[SourceConfig(path="parquet", data_files=files)],
        eval=None,
        bucket_batches=bucket_batches,
        num_workers=workers,
        prefetch_batches=max(2 * workers, 2),
        shuffle_block_rows=256,
    )
    with build_train_stream(data=data, batch_size=batch_size, seed=0) as stream:
        next(stream)  # warm-up: opens the shards and plans the first window
        first = stream.stats()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(stream)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        last = stream.stats()
    samples = last["samples"] - first["samples"]
    seconds = last["audio_seconds"] - first["audio_seconds"]
    return {
        "samples": samples,
        "audio_s": seconds,
        "wall_s": wall,
        "cpu_s": cpu,
        "samples_per_core_s": samples / cpu,
        "audio_s_per_core_s": seconds / cpu,
        "samples_per_s": samples / wall,
        "audio_s_per_s": seconds / wall,
        "padding_fraction": last["padding_fraction"],
        "wait_per_batch_ms": 1000 * (last["data_wait_total_s"] - first["data_wait_total_s"]) / batches,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="stream the tiny experiment's shards instead")
    parser.add_argument("--clips", type=int, default=300, help="generated clips (2-30 s each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode threads")
    args = parser.parse_args(argv)

    import datasets

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            files = sorted(str(p) for p in TINY_DATA.glob("train-*.parquet"))
            if not files:
                raise SystemExit(f"no tiny shards in {TINY_DATA}")
            what = f"tiny experiment shards ({len(files)} files)"
        else:
            began = time.perf_counter()
            files = generate_shards(Path(tmp), clips=args.clips)
            what = f"{args.clips} generated clips of 2-30 s ({time.perf_counter() - began:.0f} s to make)"
        print(f"data: {what}; batch size {args.batch_size}, {args.workers} decode threads, {os.cpu_count()} cores")
        print(
            f"{'bucketing':<22}{'samples/s/core':>15}{'audio-s/s/core':>16}{'samples/s':>11}{'audio-s/s':>11}"
            f"{'padding':>9}{'wait/batch':>12}"
        )
        for label, buckets in (("on (bucket_batches 32)", 32), ("off (bucket_batches 1)", 1)):
            r = measure(
                files, bucket_batches=buckets, batch_size=args.batch_size, batches=args.batches, workers=args.workers
            )
            print(
                f"{label:<22}{r['samples_per_core_s']:>15.1f}{r['audio_s_per_core_s']:>16.0f}"
                f"{r['samples_per_s']:>11.1f}{r['audio_s_per_s']:>11.0f}{r['padding_fraction']:>9.1%}"
                f"{r['wait_per_batch_ms']:>10.0f}ms"
            )


if __name__ == "__main__":
    main()
