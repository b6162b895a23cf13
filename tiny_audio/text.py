"""Transcript normalisation: corpus clean-up for training, and the English normaliser WER is computed after."""

from __future__ import annotations

import re
from functools import lru_cache

from transformers.models.whisper.english_normalizer import EnglishTextNormalizer


def clean_transcript(text: str, *, strip_patterns: list[str], lowercase: bool) -> str:
    """Remove corpus markers (e.g. `<unk>`, `[noise]`), collapse whitespace, optionally lower-case."""
    for pattern in strip_patterns:
        text = re.sub(pattern, " ", text)
    text = " ".join(text.split())
    return text.lower() if lowercase else text


@lru_cache(maxsize=1)
def _english() -> EnglishTextNormalizer:
    # Whisper's normaliser: lower case, punctuation, numbers ("twenty one" -> "21"), contractions, "mr." ...
    # Its British->American spelling table ships with Whisper's tokenizer; without it spellings are kept.
    return EnglishTextNormalizer({})


def normalize_for_wer(text: str) -> str:
    return _english()(text)
