"""The English normaliser WER is computed after, and corpus clean-up of transcripts."""

from __future__ import annotations

import math

import pytest

from tiny_audio.evaluate import word_error_rate
from tiny_audio.text import clean_transcript, normalize_for_wer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, World!", "hello world"),  # case and punctuation
        ("I'm here; we won't go.", "i am here we will not go"),  # contractions
        ("Twenty-one apples", "21 apples"),  # spelled-out numbers become digits
        ("ONE HUNDRED and two", "102"),
        ("five percent", "5%"),
        ("Mr. Smith", "mister smith"),  # titles
        ("  spaced   out  ", "spaced out"),  # whitespace
        ("uh I think um yes", "i think yes"),  # fillers
    ],
)
def test_english_normaliser(text: str, expected: str) -> None:
    assert normalize_for_wer(text) == expected


def test_spelled_and_written_numbers_and_contractions_are_the_same_words() -> None:
    assert word_error_rate(["I'm buying twenty one apples."], ["i am buying 21 apples"]) == 0.0
    assert word_error_rate(["Don't stop!"], ["do not stop"]) == 0.0


def test_wer_counts_real_errors_over_all_reference_words() -> None:
    # 1 substitution in 4 words + 1 deletion in 2 words = 2 errors / 6 words (corpus WER, not a mean of rates)
    assert word_error_rate(["the cat sat down", "hello there"], ["the dog sat down", "hello"]) == pytest.approx(2 / 6)
    assert word_error_rate(["a b"], ["a b c d"]) == pytest.approx(1.0)  # insertions count too


def test_references_that_normalise_to_nothing_are_left_out() -> None:
    assert word_error_rate(["uh", "the cat"], ["anything", "the cat"]) == 0.0
    assert math.isnan(word_error_rate(["um"], ["x"]))


def test_clean_transcript_strips_corpus_markers() -> None:
    text = "<unk> Hello   [noise] World "
    assert clean_transcript(text, strip_patterns=[r"<[^>]*>", r"\[[^\]]*\]"], lowercase=True) == "hello world"
    assert clean_transcript(text, strip_patterns=[], lowercase=False) == "<unk> Hello [noise] World"
