"""Pretrain a miniature Qwen3 decoder so a projector between it and a frozen encoder can learn ASR.

Two kinds of examples, both in exactly the trainer's prompt (user turn "{instruction} " + span, assistant turn =
sentence + <|im_end|>, loss on the assistant turn only):
- copy: the span holds the sentence's own tokens — sometimes stretched (tokens repeated, pad tokens between them,
  like the many audio frames per word the projector emits) or with a few tokens replaced. A real LLM can copy
  from its context; a miniature one must learn it, or projector training stays at ~100% WER.
- language model: an empty span, so the decoder also learns which sentences are likely.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase, Qwen3ForCausalLM

IGNORE = -100
_MARK = "\x00SPAN\x00"


@dataclass(frozen=True)
class Prompt:
    """Token ids around the span: prefix + span + suffix, then labels = sentence + end of turn."""

    prefix: list[int]
    suffix: list[int]
    end_of_turn: int


def prompt_pieces(tokenizer: PreTrainedTokenizerBase, instruction: str) -> Prompt:
    """Split the chat prompt where the trainer puts its audio placeholders (as the trainer does, via the text)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{instruction} {_MARK}"}], add_generation_prompt=True, tokenize=False
    )
    before, after = text.split(_MARK)
    suffix = tokenizer(after, add_special_tokens=False).input_ids
    return Prompt(tokenizer(before, add_special_tokens=False).input_ids, suffix, suffix[0])


def make_example(
    *, sentence_ids: list[int], prompt: Prompt, kind: str, pad_id: int, vocab: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; kind is "copy", "stretch", "noisy" or "lm"."""
    if kind == "lm":
        span: list[int] = []
    elif kind == "copy":
        span = list(sentence_ids)
    elif kind == "stretch":
        span = []
        for token in sentence_ids:
            span += [pad_id] * rng.randint(0, 2) + [token] * rng.randint(1, 2)
        span += [pad_id] * rng.randint(0, 2)
    else:  # noisy: a few tokens replaced, so the decoder leans on its language model where the span is unsure
        span = [rng.randrange(vocab) if rng.random() < 0.1 else t for t in sentence_ids]
    inputs = [*prompt.prefix, *span, *prompt.suffix]
    labels = [*sentence_ids, prompt.end_of_turn]
    return inputs + labels, [IGNORE] * len(inputs) + labels


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels [B, L] (labels shifted inside the loss)."""
    width = max(len(ids) for ids, _ in rows)
    return {
        "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows]),
    }


def pretrain_decoder(
    *,
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    copy_words: Sequence[str],
    instruction: str,
    steps: int,
    batch_size: int = 48,
    learning_rate: float = 3e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> None:
    """Train `model` in place on copy and language-model examples of `sentences`.

    A quarter of the copy examples are random sequences of `copy_words` instead of grammar sentences, so copying
    does not depend on the sentence being likely.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    prompt = prompt_pieces(tokenizer, instruction)
    pad_id, vocab = tokenizer.pad_token_id, len(tokenizer)
    encoded = [tokenizer(s, add_special_tokens=False).input_ids for s in sentences]
    kinds = ("copy", "copy", "stretch", "stretch", "stretch", "noisy", "lm", "lm")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = []
        for _ in range(batch_size):
            kind = rng.choice(kinds)
            if kind != "lm" and rng.random() < 0.25:
                words = " ".join(rng.choice(copy_words) for _ in range(rng.randint(3, 10)))
                ids = tokenizer(words, add_special_tokens=False).input_ids
            else:
                ids = rng.choice(encoded)
            rows.append(make_example(sentence_ids=ids, prompt=prompt, kind=kind, pad_id=pad_id, vocab=vocab, rng=rng))
        batch = collate(rows, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            elapsed = time.perf_counter() - start
            log(
                f"decoder step {step}/{steps} | loss {loss.item():.3f} | grad norm {grad_norm:.2f} | "
                f"lr {schedule.get_last_lr()[0]:.2e} | {elapsed:.0f}s"
            )
    model.eval()


@torch.no_grad()
def copy_accuracy(
    *, model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], instruction: str
) -> float:
    """Fraction of `sentences` the decoder reproduces exactly (greedy) when they stand in the user turn."""
    prompt = prompt_pieces(tokenizer, instruction)
    right = 0
    for sentence in sentences:
        ids = tokenizer(sentence, add_special_tokens=False).input_ids
        inputs = torch.tensor([[*prompt.prefix, *ids, *prompt.suffix]])
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=len(ids) + 4,
            do_sample=False,
            eos_token_id=prompt.end_of_turn,
            pad_token_id=tokenizer.pad_token_id,
        )
        right += tokenizer.decode(out[0, inputs.shape[1] :], skip_special_tokens=True).strip() == sentence
    return right / max(1, len(sentences))
