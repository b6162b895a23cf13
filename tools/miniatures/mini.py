"""The `mini` assets: PRETRAINED miniature models a projector can learn real ASR between, on CPU in minutes.

Built by `python -m tools.miniatures.build mini` (run it with `nice -n 10` on a shared machine):
- corpus: 3,000 train + 200 held-out eval espeak-ng utterances (no eval sentence in train), OGG/Opus ~11 kbps;
- tokenizer: byte-level BPE (768) on the train sentences;
- decoder: Qwen3 (d 128, 2 layers) pretrained on copy + language-model examples in the trainer's prompt;
- encoder: GLM-ASR tower (d 128, 4 layers) pretrained with character + BPE CTC heads, heads dropped;
- then the encoder trained on together with a fresh projector into a second decoder (the same recipe, seed 2)
  and saved over the first (`align_encoder.py`): shaped for a language model, as GLM-ASR's encoder is.
Both models are saved in float16 (the trainer loads them in float32).

Build time, measured on the 2-core development machine (`nice -n 10`, one torch thread, other jobs running part
of the time): ~39 min - corpus ~3 min, decoder ~3 min (700 steps, held-out copy accuracy 82%), encoder ~19 min
(4,000 steps, held-out greedy CTC CER 5.4%; 27% after 1,500 steps), alignment 793 s (second decoder 211 s, copy
accuracy 93%; 1,500 steps 558 s; held-out WER 2.4% through that decoder). The stages before the alignment were
timed in one end-to-end build (1,527 s), the alignment on its own (`align_stage` on the shipped CTC encoder,
which a full build also saves before aligning). Seeded: the same code gives the same sentences, tokenizer and
decoded audio (the Ogg container bytes differ between builds), and on the same machine and software (one
thread) the same weights. Another CPU rounds differently and training amplifies it: a model rebuild on another
machine (`build_mini(with_corpus=False)`, 2,728 s with other jobs running) gave other weights of the same quality
(copy accuracy 82%, CER 6.3%, alignment WER 1.9%; a `mini` run on them: WER 9.4% at step 600, shipped 5.9%).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import jiwer
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, Qwen3ForCausalLM

from tools.miniatures import corpus, grammar, models
from tools.miniatures.align_encoder import align_encoder, held_out_wer
from tools.miniatures.pretrain_decoder import copy_accuracy, pretrain_decoder
from tools.miniatures.pretrain_encoder import greedy_transcripts, pretrain_encoder
from tools.miniatures.tokenizer import INSTRUCTION, train_tokenizer

MINI_SEED = 1
MINI_TRAIN, MINI_EVAL = 3000, 200
MINI_VOCAB = 768
MINI_CODEC: corpus.Codec = "OPUS"
MINI_COMPRESSION = 1.0  # Opus at ~11 kbps: 3,200 clips in ~9 MB, espeak-ng speech still intelligible
MINI_ENCODER = models.EncoderSpec(hidden_size=128, num_layers=4, num_heads=4)
MINI_DECODER = models.DecoderSpec(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2)
ENCODER_STEPS, ENCODER_BATCH, ENCODER_LR = 4000, 16, 3e-3
DECODER_STEPS, DECODER_BATCH = 700, 32
# The alignment stage (see align_encoder.py): the second decoder's seed, and a constant 1e-3 after a short warm-up.
ALIGN_DECODER_SEED = MINI_SEED + 1
ALIGN_STEPS, ALIGN_BATCH, ALIGN_LR = 1500, 16, 1e-3
# One thread: the weights then do not depend on the machine's core count, and on a shared 2-core machine one
# thread is about twice as fast as two contending ones.
BUILD_THREADS = 1
LM_SENTENCES = 20_000  # extra grammar sentences for the decoder (never an eval sentence)


def mini_sentences() -> tuple[list[str], list[str]]:
    """(train, eval) sentences of the mini corpus; no eval sentence occurs in train."""
    sentences = grammar.sentences(count=MINI_TRAIN + MINI_EVAL, seed=MINI_SEED)
    return sentences[:MINI_TRAIN], sentences[MINI_TRAIN:]


def read_split(data_dir: Path, split: str) -> tuple[list[np.ndarray], list[str]]:
    """Decoded clips and texts of every `{split}-*.parquet` shard in `data_dir`, in shard order."""
    clips: list[np.ndarray] = []
    texts: list[str] = []
    for path in sorted(data_dir.glob(f"{split}-*.parquet")):
        shard_clips, shard_texts = corpus.read_shard(path)
        clips += shard_clips
        texts += shard_texts
    return clips, texts


def build_mini(*, out_dir: Path, with_corpus: bool = True, log: Callable[[str], None] = print) -> dict[str, float]:
    """Write `out_dir/{data,encoder,decoder}`; returns figures (corpus size, held-out copy accuracy and CER)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build_mini(out_dir=out_dir, with_corpus=with_corpus, log=log)
    finally:
        torch.set_num_threads(threads)


def _build_mini(*, out_dir: Path, with_corpus: bool, log: Callable[[str], None]) -> dict[str, float]:
    train_texts, eval_texts = mini_sentences()
    figures: dict[str, float] = {}
    if with_corpus:
        figures |= corpus.build_corpus(
            train_texts=train_texts,
            eval_texts=eval_texts,
            out_dir=out_dir / "data",
            seed=MINI_SEED,
            train_shards=4,
            codec=MINI_CODEC,
            compression_level=MINI_COMPRESSION,
        )
        log(f"corpus: {figures}")
    tokenizer = train_tokenizer(texts=[*train_texts, INSTRUCTION], vocab_size=MINI_VOCAB)

    decoder, figures["decoder_eval_copy_accuracy"] = _pretrained_decoder(
        tokenizer, train_texts, eval_texts, seed=MINI_SEED, log=log
    )
    models.save_decoder(decoder.half(), tokenizer, out_dir / "decoder")  # fp16 on disk: half the size

    encoder = models.build_encoder(spec=MINI_ENCODER, seed=MINI_SEED)
    tower = encoder.model.audio_tower
    extractor = models.feature_extractor()
    clips, texts = read_split(out_dir / "data", "train")
    char_head = pretrain_encoder(
        tower=tower,
        extractor=extractor,
        tokenizer=tokenizer,
        clips=clips,
        texts=texts,
        steps=ENCODER_STEPS,
        batch_size=ENCODER_BATCH,
        learning_rate=ENCODER_LR,
        seed=MINI_SEED,
        log=log,
    )
    eval_clips, eval_refs = read_split(out_dir / "data", "eval")
    hyps = greedy_transcripts(tower=tower, head=char_head, extractor=extractor, clips=eval_clips)
    figures["encoder_eval_cer"] = jiwer.cer(eval_refs, hyps)
    log(f"encoder: held-out CTC CER {figures['encoder_eval_cer']:.2%} (e.g. {hyps[0]!r} for {eval_refs[0]!r})")
    models.save_encoder(encoder.half(), out_dir / "encoder")
    figures |= align_stage(out_dir=out_dir, tokenizer=tokenizer, log=log)
    figures["model_megabytes"] = models.saved_megabytes(out_dir)
    return figures


def align_stage(*, out_dir: Path, tokenizer: PreTrainedTokenizerBase, log: Callable[[str], None]) -> dict[str, float]:
    """Train the saved tower on into a second decoder (another seed of the recipe); it is saved back in place.

    It starts from the tower as saved (float16), so this stage alone, rerun on the shipped CTC tower, gives what
    a full build gives.
    """
    train_texts, eval_texts = mini_sentences()
    other, accuracy = _pretrained_decoder(tokenizer, train_texts, eval_texts, seed=ALIGN_DECODER_SEED, log=log)
    figures = {"align_decoder_eval_copy_accuracy": accuracy}
    clips, texts = read_split(out_dir / "data", "train")
    with tempfile.TemporaryDirectory() as tmp:
        models.save_decoder(other.half(), tokenizer, Path(tmp))  # loaded back exactly as the trainer loads one
        model = align_encoder(
            encoder_dir=out_dir / "encoder",
            decoder_dir=Path(tmp),
            clips=clips,
            texts=texts,
            steps=ALIGN_STEPS,
            batch_size=ALIGN_BATCH,
            learning_rate=ALIGN_LR,
            seed=MINI_SEED,
            log=log,
        )
    eval_clips, eval_refs = read_split(out_dir / "data", "eval")
    figures["align_eval_wer"] = held_out_wer(model, eval_clips[:100], eval_refs[:100])
    log(f"aligned encoder: held-out WER {figures['align_eval_wer']:.2%} through the decoder it was aligned to")
    return figures


def _pretrained_decoder(
    tokenizer: PreTrainedTokenizerBase,
    train_texts: list[str],
    eval_texts: list[str],
    *,
    seed: int,
    log: Callable[[str], None],
) -> tuple[Qwen3ForCausalLM, float]:
    """The mini decoder recipe for `seed`, and its held-out copy accuracy."""
    decoder = models.build_decoder(spec=MINI_DECODER, tokenizer=tokenizer, seed=seed)
    extra = grammar.sentences(count=LM_SENTENCES, seed=seed + 100, exclude=frozenset(eval_texts))
    pretrain_decoder(
        model=decoder,
        tokenizer=tokenizer,
        sentences=[*train_texts, *extra],
        copy_words=sorted(grammar.vocabulary()),
        instruction=INSTRUCTION,
        steps=DECODER_STEPS,
        batch_size=DECODER_BATCH,
        seed=seed,
        log=log,
    )
    accuracy = copy_accuracy(model=decoder, tokenizer=tokenizer, sentences=eval_texts[:100], instruction=INSTRUCTION)
    log(f"decoder (seed {seed}): held-out copy accuracy {accuracy:.2%}")
    return decoder, accuracy
