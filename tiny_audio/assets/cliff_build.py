"""The `cliff` assets: a miniature run whose loss sits flat, then drops late and sharply, as the course's does.

Two pieces, both built from the shipped `mini` assets:
- data (`build_cliff_data`, ~1 min, not shipped: ~94 MB): three mini utterances joined into one (0.15 s of
  silence between them), 3,000 train rows from the train clips and 100 eval rows from the held-out clips;
- decoder (`build_cliff_decoder`, shipped in `cliff/decoder`): the mini decoder trained on (4,000 steps) to read
  a prompt span behind a GATE. The span is copied only when every one of its positions carries a large mark
  (a fixed vector added at 1.4-2.5x the embeddings' RMS, of random sign per position); with every mark within
  +-1.3x the span is ignored (the answer is three other sentences). The gate is shut for small marks of either
  sign, so a projector that starts with small outputs has no slope to follow towards it.

Why a gate: a large frozen language model plausibly ignores input that looks like nothing it knows and reads it
once it does; the mini decoder, trained on so little, reads whatever stands in its prompt, and the `mini` run is
gradual (see the README's log of what was tried).

Build time on the 2-core development machine (two torch threads, which the build sets): 1,125 s for the shipped
decoder (the CPU shared with a training run for the first few minutes), 1,023 s of training steps in an earlier
build alone. Seeded: on the same machine and software, the same weights (those two builds are identical bit for
bit; the README's runs used the earlier one).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3ForCausalLM

from tiny_audio.assets import corpus, grammar, models
from tiny_audio.assets.mini_build import LM_SENTENCES, MINI_SEED, mini_sentences, read_split
from tiny_audio.assets.pretrain_decoder import IGNORE, Prompt, prompt_pieces
from tiny_audio.assets.tokenizer import INSTRUCTION

JOIN = 3  # utterances (and sentences) per example
JOIN_GAP_S = 0.15
JOIN_SEED = 3
CLIFF_TRAIN, CLIFF_EVAL = 3000, 100
SHUT, OPEN_LOW, OPEN_HIGH = 1.3, 1.4, 2.5  # mark sizes, in units of the embeddings' RMS
HINT = 0.0  # share of shut spans answered with their own sentences (a hint lets the run start at once)
KINDS, KIND_WEIGHTS = ("open", "shut", "lm"), (0.4, 0.4, 0.2)
STRETCH_SHARE = 0.7
DIRECTION_SEED = 11
DECODER_STEPS, DECODER_BATCH, DECODER_LR = 4000, 32, 1e-3
BUILD_THREADS = 2
DIRECTION_FILE = "mark_direction.pt"


def build_cliff_data(
    *, src_dir: Path, out_dir: Path, train_rows: int = CLIFF_TRAIN, eval_rows: int = CLIFF_EVAL
) -> dict[str, float]:
    """Write train/eval shards of joined `src_dir` utterances under `out_dir`; returns row counts and megabytes."""
    rng = random.Random(JOIN_SEED)
    gap = np.zeros(int(JOIN_GAP_S * corpus.SAMPLE_RATE), dtype=np.float32)
    figures: dict[str, float] = {}
    for split, rows, shards in (("train", train_rows, 4), ("eval", eval_rows, 1)):
        clips, texts = read_split(src_dir, split)
        audio, joined = [], []
        for _ in range(rows):
            picks = rng.sample(range(len(texts)), JOIN)
            pieces = [piece for i in picks for piece in (gap, clips[i])][1:]
            samples = np.concatenate(pieces).astype(np.float32)
            audio.append(corpus.encode(samples, codec="VORBIS", compression_level=0.5))
            joined.append(" ".join(texts[i] for i in picks))
        corpus.write_shards(audio=audio, texts=joined, out_dir=out_dir, split=split, num_shards=shards)
        figures[f"{split}_rows"] = rows
    figures["megabytes"] = sum(p.stat().st_size for p in out_dir.glob("*.parquet")) / 1e6
    return figures


def mark_direction(embeddings: torch.Tensor) -> torch.Tensor:
    """The fixed mark vector [D]: random, scaled to the RMS of the token embeddings [V, D]."""
    rms = embeddings.detach().pow(2).mean().sqrt()
    direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(DIRECTION_SEED))
    return direction / direction.pow(2).mean().sqrt() * rms


def stretch(ids: Sequence[int], pad_id: int, rng: random.Random) -> list[int]:
    """Tokens repeated and padded the way audio frames stretch a word over several positions."""
    span: list[int] = []
    for token in ids:
        span += [pad_id] * rng.randint(0, 2) + [token] * rng.randint(1, 2)
    return span + [pad_id] * rng.randint(0, 2)


def example(
    *,
    model: Qwen3ForCausalLM,
    prompt: Prompt,
    span: Sequence[int],
    marks: Sequence[float],
    answer: Sequence[int],
    direction: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds [L, D], labels [L]) of one example: span positions carry `marks` x `direction`."""
    ids = torch.tensor([*prompt.prefix, *span, *prompt.suffix, *answer, prompt.end_of_turn])
    embeds = model.get_input_embeddings()(ids)
    if span:
        start = len(prompt.prefix)
        embeds = embeds.clone()
        embeds[start : start + len(span)] += torch.tensor(marks)[:, None] * direction
    prompt_len = len(prompt.prefix) + len(span) + len(prompt.suffix)
    labels = torch.tensor([IGNORE] * prompt_len + [*answer, prompt.end_of_turn])
    return embeds, labels


def answer_loss(
    model: Qwen3ForCausalLM, rows: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_embed: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of right-padded `rows`."""
    width = max(embeds.shape[0] for embeds, _ in rows)
    inputs = torch.stack([torch.cat([e, pad_embed.expand(width - e.shape[0], -1)]) for e, _ in rows])
    mask = torch.tensor([[1] * e.shape[0] + [0] * (width - e.shape[0]) for e, _ in rows])
    labels = torch.stack([torch.cat([lab, torch.full((width - lab.shape[0],), IGNORE)]) for _, lab in rows])
    logits = model(inputs_embeds=inputs, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


def build_cliff_decoder(
    *, src_dir: Path, out_dir: Path, steps: int = DECODER_STEPS, log: Callable[[str], None] = print
) -> None:
    """Train the mini decoder in `src_dir` on behind the mark gate; save it (and the mark) to `out_dir`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        _build_cliff_decoder(src_dir=src_dir, out_dir=out_dir, steps=steps, log=log)
    finally:
        torch.set_num_threads(threads)


def _build_cliff_decoder(*, src_dir: Path, out_dir: Path, steps: int, log: Callable[[str], None]) -> None:
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(src_dir)
    model = Qwen3ForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    direction = mark_direction(model.get_input_embeddings().weight)
    prompt = prompt_pieces(tokenizer, INSTRUCTION)
    train_texts, eval_texts = mini_sentences()
    extra = grammar.sentences(count=LM_SENTENCES, seed=MINI_SEED + 100, exclude=frozenset(eval_texts))
    pool = [*train_texts, *extra]
    rng = random.Random(0)
    torch.manual_seed(0)

    def joined() -> list[int]:
        return tokenizer(" ".join(rng.sample(pool, JOIN)), add_special_tokens=False).input_ids

    optimizer = torch.optim.AdamW(model.parameters(), lr=DECODER_LR, weight_decay=0.01)
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1, s / steps)))
    )
    pad_id = tokenizer.pad_token_id
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = []
        for _ in range(DECODER_BATCH):
            ids = joined()
            kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
            if kind == "lm":
                span, marks, answer = [], [], ids
            else:
                span = stretch(ids, pad_id, rng) if rng.random() < STRETCH_SHARE else list(ids)
                if kind == "open":
                    marks = [rng.choice((-1, 1)) * rng.uniform(OPEN_LOW, OPEN_HIGH) for _ in span]
                    answer = ids
                else:
                    marks = [rng.uniform(-SHUT, SHUT) for _ in span]
                    answer = ids if rng.random() < HINT else joined()
            rows.append(example(model=model, prompt=prompt, span=span, marks=marks, answer=answer, direction=direction))
        pad_embed = model.get_input_embeddings().weight[pad_id].detach()[None]
        loss = answer_loss(model, rows, pad_embed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"cliff decoder step {step}/{steps} | loss {loss.item():.3f} | {time.perf_counter() - start:.0f}s")
    model.eval()
    models.save_decoder(model.half(), tokenizer, out_dir)
    torch.save(direction, out_dir / DIRECTION_FILE)


@torch.no_grad()
def gate_losses(decoder_dir: Path, marks: Sequence[float], *, triples: int = 60) -> dict[float, float]:
    """Answer loss (nats per token) on held-out sentence triples, by the mark size on every span position.

    The mark's sign is random per position, as in training; `float("nan")` stands for an empty span.
    """
    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    model = Qwen3ForCausalLM.from_pretrained(decoder_dir, dtype=torch.float32).eval()
    direction = torch.load(decoder_dir / DIRECTION_FILE)
    prompt = prompt_pieces(tokenizer, INSTRUCTION)
    _, eval_texts = mini_sentences()
    rng = random.Random(5)
    answers = [
        tokenizer(" ".join(rng.sample(eval_texts, JOIN)), add_special_tokens=False).input_ids for _ in range(triples)
    ]
    spans = [stretch(ids, tokenizer.pad_token_id, rng) for ids in answers]
    pad_embed = model.get_input_embeddings().weight[tokenizer.pad_token_id][None]
    losses = {}
    for mark in marks:
        rows = [
            example(
                model=model,
                prompt=prompt,
                span=[] if math.isnan(mark) else span,
                marks=[] if math.isnan(mark) else [rng.choice((-1, 1)) * mark for _ in span],
                answer=ids,
                direction=direction,
            )
            for span, ids in zip(spans, answers, strict=True)
        ]
        losses[mark] = answer_loss(model, rows, pad_embed).item()
    return losses
