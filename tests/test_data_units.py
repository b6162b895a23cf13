"""The pieces of the data pipeline on their own: text and audio filters, decoding, the seeded order, bucketing."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import FORMATS, clip, encode, tone

from tiny_audio.data.audio import SAMPLE_RATE, AudioError, decode, probe
from tiny_audio.data.batching import bucket, collate
from tiny_audio.data.filters import (
    DropReason,
    TextNormalizer,
    check_duration,
    check_text,
    check_waveform,
)
from tiny_audio.data.order import SourceChooser, block_order, shard_order, unit_uniform
from tiny_audio.errors import ConfigError

DEFAULT_MARKERS = [r"<[^>]*>", r"\[[^\]]*\]"]


def test_text_normalizer_strips_markers_collapses_space_and_lowercases() -> None:
    normalize = TextNormalizer(strip_patterns=DEFAULT_MARKERS, lowercase=True)
    assert normalize("  Hello <unk>  World [noise]\tAgain\n") == "hello world again"
    assert normalize("<unk> [noise]") == ""
    assert normalize(None) == ""
    keep_case = TextNormalizer(strip_patterns=[], lowercase=False)
    assert keep_case("Hello  <b>") == "Hello <b>"


def test_text_normalizer_rejects_a_bad_pattern_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"\[unclosed"):
        TextNormalizer(strip_patterns=["[unclosed"], lowercase=False, source="data.train[0]")


def test_check_text_reasons() -> None:
    words = lambda text: len(text.split())  # noqa: E731
    assert check_text("", max_label_tokens=3, count_tokens=words) is DropReason.EMPTY_TEXT
    assert check_text("a b c d", max_label_tokens=3, count_tokens=words) is DropReason.TOO_MANY_TOKENS
    assert check_text("a b c", max_label_tokens=3, count_tokens=words) is None
    assert check_text("a b c d", max_label_tokens=3, count_tokens=None) is None


def test_check_duration_and_waveform() -> None:
    assert check_duration(30.01, min_seconds=0.3, max_seconds=30) is DropReason.TOO_LONG
    assert check_duration(0.2, min_seconds=0.3, max_seconds=30) is DropReason.TOO_SHORT
    assert check_duration(30.0, min_seconds=0.3, max_seconds=30) is None
    wave = tone(0.5)
    assert check_waveform(wave, silence_rms=1e-4) is None
    assert check_waveform(np.zeros(8000, np.float32), silence_rms=1e-4) is DropReason.SILENCE
    assert check_waveform(np.zeros(0, np.float32), silence_rms=1e-4) is DropReason.SILENCE
    for bad in (np.nan, np.inf):
        spoiled = wave.copy()
        spoiled[10] = bad
        assert check_waveform(spoiled, silence_rms=1e-4) is DropReason.NON_FINITE


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}-{f[1]}-{f[2]}")
def test_decode_every_format_to_16k_mono(fmt: tuple[str, str, int]) -> None:
    data = clip(1.25, seed=3, fmt=fmt)
    info = probe(data)
    assert info.sample_rate == fmt[2] and info.seconds == pytest.approx(1.25, abs=1e-3)
    decoded = decode(data)
    assert decoded.wave.dtype == np.float32 and decoded.wave.ndim == 1
    assert decoded.resampled == (fmt[2] != SAMPLE_RATE)
    assert decoded.seconds == pytest.approx(1.25, abs=1e-3)
    assert decoded.wave.shape[0] == pytest.approx(1.25 * SAMPLE_RATE, abs=2)
    assert 0.1 < float(np.sqrt(np.mean(decoded.wave**2))) < 0.4


def test_decode_stereo_averages_the_channels() -> None:
    left = tone(0.5, rate=SAMPLE_RATE, seed=1)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    decoded = decode(encode(stereo, rate=SAMPLE_RATE, subtype="FLOAT"))
    np.testing.assert_allclose(decoded.wave, left / 2, atol=1e-6)


@pytest.mark.parametrize("data", [b"", None, b"RIFF" + b"\x00" * 40, b"not audio at all" * 64])
def test_unreadable_bytes_raise_audio_error(data: bytes | None) -> None:
    with pytest.raises(AudioError):
        probe(data)
    with pytest.raises(AudioError):
        decode(data)


def test_shard_and_block_orders_are_seeded_permutations() -> None:
    first = shard_order(seed=7, source=0, epoch=0, num_shards=50, shuffle=True)
    assert sorted(first) == list(range(50))
    assert first == shard_order(seed=7, source=0, epoch=0, num_shards=50, shuffle=True)
    assert first != shard_order(seed=7, source=0, epoch=1, num_shards=50, shuffle=True)
    assert first != shard_order(seed=8, source=0, epoch=0, num_shards=50, shuffle=True)
    assert first != shard_order(seed=7, source=1, epoch=0, num_shards=50, shuffle=True)
    assert shard_order(seed=7, source=0, epoch=3, num_shards=5, shuffle=False) == [0, 1, 2, 3, 4]
    block = block_order(seed=7, source=0, epoch=0, shard=2, block=1, rows=100, shuffle=True)
    assert sorted(block) == list(range(100)) and block != list(range(100))
    assert block != block_order(seed=7, source=0, epoch=0, shard=2, block=2, rows=100, shuffle=True)
    assert block_order(seed=7, source=0, epoch=0, shard=2, block=1, rows=4, shuffle=False) == [0, 1, 2, 3]


def test_source_choice_follows_the_weights_and_depends_only_on_seed_and_index() -> None:
    choose = SourceChooser([3.0, 1.0], seed=11)
    picks = np.array([choose(i) for i in range(20_000)])
    assert abs((picks == 0).mean() - 0.75) < 0.015
    assert [choose(i) for i in range(500, 600)] == [SourceChooser([3.0, 1.0], seed=11)(i) for i in range(500, 600)]
    assert unit_uniform(1, 5) == unit_uniform(1, 5) != unit_uniform(2, 5)
    assert SourceChooser([1.0], seed=0)(123) == 0


def test_bucket_sorts_by_duration_and_shuffles_whole_batches() -> None:
    rng = np.random.default_rng(0)
    durations = rng.uniform(0.5, 30, size=24).tolist()
    plain = bucket(durations, batch_size=4, rng=None)
    assert [j for b in plain for j in b] == sorted(range(24), key=lambda j: durations[j])
    shuffled = bucket(durations, batch_size=4, rng=np.random.default_rng(1))
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, plain)) and shuffled != plain
    assert shuffled == bucket(durations, batch_size=4, rng=np.random.default_rng(1))
    assert [len(b) for b in bucket(durations[:10], batch_size=4, rng=None)] == [4, 4, 2]


def test_collate_pads_to_the_longest_clip_only() -> None:
    waves = [np.ones(3, np.float32), np.ones(5, np.float32) * 2]
    batch = collate(waves, texts=["a", "b"], keys=["k1", "k2"])
    assert batch.audio.shape == (2, 5) and batch.audio.dtype.is_floating_point
    assert batch.audio_lengths.tolist() == [3, 5] and len(batch) == 2
    assert batch.audio[0].tolist() == [1, 1, 1, 0, 0]
    assert batch.padding == (2, 10)
