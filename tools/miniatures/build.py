"""Regenerate the shipped assets: `python -m tools.miniatures.build [tiny|mini|cliff|cliff-data|all] [--no-corpus]`.

tiny (~15 s): 400 + 40 espeak-ng utterances, a byte-level BPE tokenizer, RANDOM miniature encoder and decoder.
mini (see tiny_audio/assets/mini_build.py for its timing): a larger corpus and PRETRAINED miniature models.
cliff (~17 min, from mini): the gated decoder of the `cliff` experiment (see tiny_audio/assets/cliff_build.py).
cliff-data (~1 min, from mini, not shipped): that experiment's joined utterances; `make cliff` builds them.

Everything is seeded: a rebuild gives the same sentences, tokenizer and weights (trained weights: on the same
machine and software; see mini_build.py), and audio that decodes to the same samples. `--no-corpus` keeps the
shipped corpus and rebuilds only what is derived from its sentences.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import transformers

from tiny_audio.assets import ASSETS_DIR
from tools.miniatures import corpus, grammar, models
from tools.miniatures.tokenizer import INSTRUCTION, train_tokenizer

TINY_SEED = 0
TINY_TRAIN, TINY_EVAL = 400, 40
TINY_VOCAB = 768
TINY_ENCODER = models.EncoderSpec(hidden_size=64, num_layers=2, num_heads=4)
TINY_DECODER = models.DecoderSpec(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)


def tiny_sentences() -> tuple[list[str], list[str]]:
    """(train, eval) sentences of the tiny corpus; no eval sentence occurs in train."""
    sentences = grammar.sentences(count=TINY_TRAIN + TINY_EVAL, seed=TINY_SEED)
    return sentences[:TINY_TRAIN], sentences[TINY_TRAIN:]


def build_tiny(*, out_dir: Path, with_corpus: bool = True) -> dict[str, float]:
    """Write `out_dir/{data,encoder,decoder}`; returns figures (clips, seconds, megabytes) for the log."""
    train_texts, eval_texts = tiny_sentences()
    figures: dict[str, float] = {}
    if with_corpus:
        figures |= corpus.build_corpus(
            train_texts=train_texts,
            eval_texts=eval_texts,
            out_dir=out_dir / "data",
            seed=TINY_SEED,
            train_shards=4,
            codec="VORBIS",
            compression_level=1.0,
        )
    tokenizer = train_tokenizer(texts=[*train_texts, INSTRUCTION], vocab_size=TINY_VOCAB)
    models.save_decoder(
        models.build_decoder(spec=TINY_DECODER, tokenizer=tokenizer, seed=TINY_SEED), tokenizer, out_dir / "decoder"
    )
    models.save_encoder(models.build_encoder(spec=TINY_ENCODER, seed=TINY_SEED), out_dir / "encoder")
    figures["model_megabytes"] = models.saved_megabytes(out_dir)
    return figures


@click.command()
@click.argument("which", type=click.Choice(["tiny", "mini", "all"]), default="tiny")
@click.option("--no-corpus", is_flag=True, help="Keep the shipped speech corpus; rebuild tokenizer and models.")
def main(which: str, no_corpus: bool) -> None:
    """Regenerate the shipped miniature assets under tiny_audio/assets/."""
    if not no_corpus and which in ("tiny", "mini", "all") and corpus.espeak_binary() is None:
        sys.exit("espeak-ng is not installed (apt-get install espeak-ng), or pass --no-corpus")
    transformers.utils.logging.set_verbosity_error()  # the alignment stage loads only the tower, as expected
    builders = {"tiny": build_tiny}
    if which in ("mini", "all"):
        from tools.miniatures.mini import build_mini

        builders["mini"] = build_mini
    for name in ("tiny", "mini") if which == "all" else (which,):
        start = time.perf_counter()
        out_dir = ASSETS_DIR / name
        figures = builders[name](out_dir=out_dir, with_corpus=not no_corpus)
        figures["build_seconds"] = round(time.perf_counter() - start, 1)
        click.echo(f"{name}: {json.dumps({k: round(v, 2) for k, v in figures.items()})}")


if __name__ == "__main__":
    main()
