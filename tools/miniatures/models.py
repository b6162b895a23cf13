"""Miniature GLM-ASR encoder and Qwen3 decoder built from configs with a fixed seed.

The encoder is saved as a FULL `GlmAsrForConditionalGeneration` directory (audio tower + a few-KB language
model), the layout of the real zai-org/GLM-ASR-Nano-2512, so the production tower-only loading path is what
the tests and the tiny/mini experiments exercise:
`GlmAsrEncoder.from_pretrained(path, key_mapping={r"^(model\\.)?audio_tower\\.": ""}, output_loading_info=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GlmAsrConfig,
    GlmAsrEncoder,
    GlmAsrForConditionalGeneration,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
    WhisperFeatureExtractor,
)

from tiny_audio.model.encoder import tower_key_mapping

# Turns the checkpoint's `audio_tower.*` keys into a bare GlmAsrEncoder's (loaded alone, the encoder would
# silently come back random: transformers fills tensors it cannot find and only logs it).
TOWER_KEY_MAPPING = tower_key_mapping("glmasr")
NUM_MEL_BINS = 128
# The language model inside the GLM-ASR checkpoint is never used; it only has to exist and be tiny.
_STUB_TEXT_CONFIG = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "eos_token_id": 0,
}


@dataclass(frozen=True)
class EncoderSpec:
    """Size of a miniature GLM-ASR audio tower (intermediate_size must be 4 x hidden_size: GLM-ASR's own
    projector reshapes 4 frames of hidden_size into one vector of intermediate_size)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4


@dataclass(frozen=True)
class DecoderSpec:
    """Size of a miniature Qwen3 decoder."""

    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 1024


def feature_extractor() -> WhisperFeatureExtractor:
    """The log-mel front end of GLM-ASR: 128 mel bins, 16 kHz, 10 ms hop, 25 ms window."""
    return WhisperFeatureExtractor(feature_size=NUM_MEL_BINS, sampling_rate=16_000, hop_length=160, n_fft=400)


def encoder_config(spec: EncoderSpec) -> GlmAsrConfig:
    audio = {
        "model_type": "glmasr_encoder",
        "hidden_size": spec.hidden_size,
        "intermediate_size": 4 * spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_mel_bins": NUM_MEL_BINS,
    }
    return GlmAsrConfig(audio_config=audio, text_config=dict(_STUB_TEXT_CONFIG), audio_token_id=63)


def build_encoder(*, spec: EncoderSpec, seed: int) -> GlmAsrForConditionalGeneration:
    """A randomly initialised full GLM-ASR model whose audio tower has `spec`'s size (same seed -> same weights)."""
    torch.manual_seed(seed)
    return GlmAsrForConditionalGeneration(encoder_config(spec)).eval()


def decoder_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """len(tokenizer) rounded up to a multiple of 64, keeping at least 8 spare ids (the trainer's `<audio>`)."""
    return -(-(len(tokenizer) + 8) // 64) * 64


def decoder_config(*, spec: DecoderSpec, tokenizer: PreTrainedTokenizerBase) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=decoder_vocab_size(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_decoder(*, spec: DecoderSpec, tokenizer: PreTrainedTokenizerBase, seed: int) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM sized by `spec` for `tokenizer` (same seed -> same weights)."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(decoder_config(spec=spec, tokenizer=tokenizer)).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_encoder(model: GlmAsrForConditionalGeneration, path: Path) -> None:
    """The full GLM-ASR directory plus the feature extractor's preprocessor_config.json."""
    model.save_pretrained(path)
    feature_extractor().save_pretrained(path)


def save_decoder(model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def saved_megabytes(out_dir: Path) -> float:
    """Size on disk of the encoder and decoder saved under `out_dir` (what a build commits), in MB."""
    return sum(f.stat().st_size for sub in ("encoder", "decoder") for f in (out_dir / sub).iterdir()) / 1e6


def load_tower(path: str | Path) -> GlmAsrEncoder:
    """Only the audio tower of a saved GLM-ASR directory; raises if any tower weight is missing.

    A bare `GlmAsrEncoder.from_pretrained(path)` silently returns a RANDOM encoder: the key mapping is required.
    """
    tower, info = GlmAsrEncoder.from_pretrained(
        path, key_mapping=TOWER_KEY_MAPPING, output_loading_info=True, dtype=torch.float32
    )
    if info["missing_keys"]:
        raise ValueError(f"{path}: audio tower weights missing: {sorted(info['missing_keys'])[:5]}")
    return tower.eval()
