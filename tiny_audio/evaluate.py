"""Held-out evaluation: loss over the eval set, and WER of greedy transcripts after English normalisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import jiwer
import torch

from tiny_audio.data.eval import EvalSet
from tiny_audio.model.asr import ASRModel
from tiny_audio.text import normalize_for_wer


@dataclass
class EvalResult:
    loss: float
    wer: float | None
    num_samples: int
    examples: list[tuple[str, str]] = field(default_factory=list)  # (reference, hypothesis)

    def metrics(self, *, best_wer: float | None = None) -> dict[str, float]:
        out = {"eval/loss": self.loss}
        if self.wer is not None:
            out["eval/wer"] = self.wer
        if best_wer is not None:
            out["eval/best_wer"] = best_wer
        return out

    def line(self, step: int, data: str) -> str:
        """`Eval step 1000 | Loss: 2.412 | WER: 63.0% | data: ...`, then two example transcripts."""
        wer = f" | WER: {self.wer:.1%}" if self.wer is not None else ""
        examples = "".join(f"\n  ref: {ref}\n  hyp: {hyp}" for ref, hyp in self.examples[:2])
        return f"Eval step {step} | Loss: {self.loss:.3f}{wer} | {data}{examples}"


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER after normalisation; a reference that normalises to nothing is left out."""
    pairs = [(normalize_for_wer(r), normalize_for_wer(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return float("nan")
    refs, hyps = zip(*pairs, strict=True)
    return float(jiwer.wer(list(refs), list(hyps)))


@torch.no_grad()
def evaluate(
    model: ASRModel,
    eval_set: EvalSet,
    *,
    device: torch.device,
    max_new_tokens: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> EvalResult:
    """Token-normalised loss over every batch; greedy WER over the set's transcribed batches (its WER subset)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens, refs, hyps = 0.0, 0, [], []
    for i, batch in enumerate(eval_set.batches):
        audio, lengths = batch.audio.to(device), batch.audio_lengths.to(device)
        with autocast():
            out = model(audio, lengths, batch.texts)
            loss_sum += float(out.loss_sum)
            tokens += out.num_tokens
            if i < eval_set.transcribed:
                hyps += model.generate(audio, lengths, max_new_tokens=max_new_tokens)
                refs += batch.texts
    model.train(was_training)
    wer = word_error_rate(refs, hyps) if refs else None
    return EvalResult(
        loss=loss_sum / max(tokens, 1), wer=wer, num_samples=len(refs), examples=list(zip(refs, hyps, strict=True))[:4]
    )
