"""Shared fixtures: tiny real models (GLM-ASR tower, Qwen3, a byte-level BPE tokenizer) built from configs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Never reach the network, never prompt: set before any test imports huggingface_hub or wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's template behaves this way at the generation prompt: the empty think block appears only when the caller
# passes enable_thinking=false (a hybrid reasoning model that thinks unless told not to).
QWEN3_LIKE_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "transcribe the audio please",
    "a tiny model learns to listen",
    "speech recognition on a rented gpu",
]


def build_tiny_models(
    root: Path, *, seed: int = 0, decoder_hidden: int = 64, chat_template: str = CHATML
) -> tuple[Path, Path]:
    """A tiny GLM-ASR checkpoint (tower + small LLM, as the real one) and a tiny Qwen3 + tokenizer, on disk.

    The tokenizer knows Qwen3's think markers as added tokens (as Qwen3's does); `chat_template` decides whether
    a prompt ever holds them.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GlmAsrConfig,
        GlmAsrForConditionalGeneration,
        PreTrainedTokenizerFast,
        Qwen3Config,
        Qwen3ForCausalLM,
        WhisperFeatureExtractor,
    )

    torch.manual_seed(seed)
    encoder_dir, decoder_dir = root / "encoder", root / "decoder"
    audio = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    GlmAsrForConditionalGeneration(GlmAsrConfig(audio_config=audio, text_config=text)).save_pretrained(encoder_dir)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(encoder_dir)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, chat_template=chat_template, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(decoder_dir)
    vocab = (len(tokenizer) + 8 + 63) // 64 * 64
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=decoder_hidden,
        intermediate_size=2 * decoder_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(decoder_dir)
    return encoder_dir, decoder_dir


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def qwen3_like_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """As `tiny_model_dirs`, with a chat template that switches thinking as Qwen3's does."""
    return build_tiny_models(tmp_path_factory.mktemp("qwen3-like-models"), chat_template=QWEN3_LIKE_CHAT)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Commands configure logging for a process; leave the test session's (pytest's capture) as it was."""
    import logging

    names = ["", "tiny_audio", "huggingface_hub", "transformers", "datasets", "accelerate"]
    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level) for n in names
    }
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)
