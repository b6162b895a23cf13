"""The benchmarks' workload: models built from configs with random weights at given sizes (nothing is
downloaded), and clips of a realistic length distribution (2-30 s, mean ~10 s, ~2.5 words/s), bucketed as the
trainer buckets them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from transformers import (
    GlmAsrEncoder,
    GlmAsrEncoderConfig,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
    WhisperFeatureExtractor,
)

from tiny_audio.assets import resolve_asset
from tiny_audio.config import ProjectorConfig
from tiny_audio.data.batching import Batch, bucket, collate
from tiny_audio.model.asr import ASRModel, PromptBuilder
from tiny_audio.model.encoder import AudioEncoder
from tiny_audio.model.loading import embedding_rms, load_tokenizer
from tiny_audio.model.projectors import build_projector
from tools.miniatures import grammar

SAMPLE_RATE = 16_000


MAX_SECONDS = 30.0


# -- sizes ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    enc_dim: int
    enc_layers: int
    enc_heads: int
    enc_ffn: int
    dec_dim: int
    dec_layers: int
    dec_heads: int
    dec_kv_heads: int
    dec_head_dim: int
    dec_ffn: int
    vocab: int
    proj_hidden: int
    stack: int = 4
    n_mels: int = 128


# Published configs (hard-coded so nothing is downloaded):
# - zai-org/GLM-ASR-Nano-2512 audio tower = transformers' GlmAsrEncoderConfig defaults: 32 layers, hidden 1280,
#   20 heads, intermediate 5120, 128 mel bins, conv stride 2 (50 Hz);
# - Qwen/Qwen3-0.6B config.json: hidden 1024, 28 layers, 16 heads / 8 KV heads, head_dim 128, intermediate 3072,
#   vocab 151936; Qwen/Qwen3-1.7B config.json: hidden 2048, intermediate 6144, otherwise the same;
# - projector: the mlp experiment (stack 4, hidden 2048).
REAL_06B = Sizes(1280, 32, 20, 5120, 1024, 28, 16, 8, 128, 3072, 151_936, 2048)


REAL_17B = Sizes(1280, 32, 20, 5120, 2048, 28, 16, 8, 128, 6144, 151_936, 2048)
REAL_SIZES = {"0.6b": REAL_06B, "1.7b": REAL_17B}


# Peak dense bf16 tensor throughput from NVIDIA's datasheets (A40: 149.7 TFLOPS; H100 SXM5: 989 TFLOPS).
GPU_PEAK_FLOPS = {"A40": 149.7e12, "H100 SXM": 989e12}


BENCH_DEFAULT = Sizes(320, 8, 5, 1280, 256, 7, 4, 2, 64, 768, 151_936, 512)


def build_model(sizes: Sizes, *, projector: str, device: torch.device, dtype: torch.dtype, seed: int) -> ASRModel:
    """An ASRModel with random frozen parts built from configs, the tiny asset tokenizer and a fresh projector.

    The frozen parts are initialised on `device` (at the real sizes a CPU takes minutes to fill 2B random weights)."""
    torch.manual_seed(seed)
    with torch.device(device):
        tower, decoder = _frozen_parts(sizes, dtype=dtype)
    encoder = AudioEncoder(tower=tower, kind="glmasr", attn_implementation="sdpa")
    tokenizer = load_tokenizer(resolve_asset("asset://tiny/decoder"), audio_token="<audio>")
    prompt = PromptBuilder(tokenizer=tokenizer, instruction="Transcribe the audio.", audio_token="<audio>")
    proj = build_projector(
        ProjectorConfig(type=projector, stack=sizes.stack, hidden_dim=sizes.proj_hidden),
        in_dim=sizes.enc_dim,
        out_dim=sizes.dec_dim,
        target_rms=embedding_rms(decoder),
    )
    extractor = WhisperFeatureExtractor(feature_size=sizes.n_mels)
    model = ASRModel(encoder=encoder, extractor=extractor, projector=proj, decoder=decoder, prompt=prompt)
    return model.to(device).train()


def _frozen_parts(sizes: Sizes, *, dtype: torch.dtype) -> tuple[GlmAsrEncoder, Qwen3ForCausalLM]:
    tower = GlmAsrEncoder(
        GlmAsrEncoderConfig(
            hidden_size=sizes.enc_dim,
            num_hidden_layers=sizes.enc_layers,
            num_attention_heads=sizes.enc_heads,
            num_key_value_heads=sizes.enc_heads,
            intermediate_size=sizes.enc_ffn,
            num_mel_bins=sizes.n_mels,
            attn_implementation="sdpa",
        )
    ).to(dtype)
    decoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=sizes.vocab,
            hidden_size=sizes.dec_dim,
            num_hidden_layers=sizes.dec_layers,
            num_attention_heads=sizes.dec_heads,
            num_key_value_heads=sizes.dec_kv_heads,
            head_dim=sizes.dec_head_dim,
            intermediate_size=sizes.dec_ffn,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
    ).to(dtype)
    return tower, decoder


# -- clips and batches ---------------------------------------------------------------------------------------------
@dataclass
class Clip:
    seconds: float
    text: str
    wave: np.ndarray | None = None


def sample_seconds(count: int, *, rng: np.random.Generator) -> np.ndarray:
    """Clip durations: gamma(shape 2.5, scale 4 s) redrawn outside 2-30 s, which gives a mean of ~10 s."""
    out = np.empty(0)
    while out.size < count:
        draw = rng.gamma(2.5, 4.0, size=2 * count)
        out = np.concatenate([out, draw[(draw >= 2.0) & (draw <= MAX_SECONDS)]])
    return out[:count]


def sample_clips(count: int, *, tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator) -> list[Clip]:
    """Clips of realistic length with transcripts of ~2.5 words per second and ~1.3 tokens per word.

    Words come from the tiny corpus's grammar: 70% of one token and 30% of two in the benchmark's tokenizer, so
    a transcript has as many tokens as Qwen3's tokenizer gives ordinary English (about 1.3 per word).
    """
    words = (*grammar.NOUNS, *grammar.ADJECTIVES, *grammar.NAMES, *grammar.PLACES, *grammar.PAST_VERBS)
    size = {w: len(tokenizer(" " + w, add_special_tokens=False).input_ids) for w in words}
    pools = [[w for w in words if size[w] == n] for n in (1, 2)]
    clips = []
    for seconds in sample_seconds(count, rng=rng):
        n = max(1, int(rng.poisson(2.5 * seconds)))
        text = [rng.choice(pools[int(rng.random() < 0.3)]) for _ in range(n)]
        clips.append(Clip(float(seconds), " ".join(text)))
    return clips


def bucketed(clips: list[Clip], *, batch_size: int, bucket_batches: int, rng: np.random.Generator) -> list[list[Clip]]:
    """The training pipeline's bucketing (`data.batching.bucket`): windows sorted by duration, batch order shuffled."""
    window = batch_size * bucket_batches
    out = []
    for start in range(0, len(clips) - window + 1, window):
        part = clips[start : start + window]
        out += [[part[j] for j in g] for g in bucket([c.seconds for c in part], batch_size=batch_size, rng=rng)]
    return out


def with_audio(batches: list[list[Clip]], *, rng: np.random.Generator) -> list[list[Clip]]:
    """Give each clip a noise waveform of its length (made before timing: decoding is `bench.data`'s subject)."""
    return [
        [
            Clip(c.seconds, c.text, (0.1 * rng.standard_normal(int(c.seconds * SAMPLE_RATE))).astype(np.float32))
            for c in b
        ]
        for b in batches
    ]


def collate_clips(clips: list[Clip], *, pad_to: int | None = None) -> Batch:
    batch = collate([c.wave for c in clips], texts=[c.text for c in clips], keys=[str(i) for i in range(len(clips))])
    if pad_to is not None:
        batch.audio = F.pad(batch.audio, (0, pad_to - batch.audio.shape[1]))
        batch.audio_lengths = torch.full_like(batch.audio_lengths, pad_to)  # the model sees 30 s of every clip
    return batch
