"""Pretrain a miniature GLM-ASR audio tower with two CTC heads (characters and BPE tokens), then drop the heads.

Why both heads: the character head gives a dense, easy alignment signal early on; the BPE head makes the
tower's frames carry the identity of the decoder's own tokens, which is what the projector has to map them to.
The features are exactly what the trainer feeds the frozen tower: its own `LogMel` module (the
`WhisperFeatureExtractor(feature_size=128)` recipe in torch), zero-padded to an even length, with a padding mask
on attention (GlmAsrEncoder applies none itself).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import GlmAsrEncoder, PreTrainedTokenizerBase, WhisperFeatureExtractor

from tiny_audio.model.features import LogMel

CHARS = " 'abcdefghijklmnopqrstuvwxyz"  # CTC blank is id 0, characters are 1..len(CHARS)


def log_mel(clips: Sequence[np.ndarray], extractor: WhisperFeatureExtractor) -> list[torch.Tensor]:
    """Each 16 kHz clip -> its log-mel [n_mels, T] (T even), computed by the trainer's `LogMel` for one clip."""
    front_end = LogMel(extractor=extractor)
    out = []
    for clip in clips:
        audio = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None]  # [1, S]
        mel, _ = front_end(audio, torch.tensor([audio.shape[-1]]))
        out.append(mel[0])  # [n_mels, T], T even
    return out


def length_batches(lengths: Sequence[int], *, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches of similar length (little padding), batches in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def endless_batches(lengths: Sequence[int], *, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """`length_batches`, drawn anew from `rng` after each pass over the data, for as many steps as asked."""
    while True:
        yield from reversed(length_batches(lengths, batch_size=batch_size, rng=rng))


def pad_features(mels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad log-mels to one length: features [B, n_mels, T] and encoder output lengths [B] (T_mel / 2)."""
    width = max(m.shape[-1] for m in mels)
    features = torch.stack([F.pad(m, (0, width - m.shape[-1])) for m in mels])
    return features, torch.tensor([m.shape[-1] // 2 for m in mels])


def encode(tower: GlmAsrEncoder, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """features [B, n_mels, T] -> hidden [B, T/2, C], padded frames masked out of attention (sdpa bool mask)."""
    valid = torch.arange((features.shape[-1] + 1) // 2)[None, :] < lengths[:, None]  # [B, T_enc]
    return tower(features, attention_mask=valid[:, None, None, :]).last_hidden_state


def spec_augment(features: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Two frequency masks (<= 16 bins) and two time masks (<= 12 frames) per batch: cheap regularisation."""
    features = features.clone()
    n_mels, frames = features.shape[1], features.shape[2]
    for _ in range(2):
        f = rng.randint(0, 16)
        f0 = rng.randint(0, n_mels - f)
        features[:, f0 : f0 + f, :] = 0
        t = rng.randint(0, min(12, frames // 4))
        t0 = rng.randint(0, frames - t)
        features[:, :, t0 : t0 + t] = 0
    return features


def _targets(ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([i for row in ids for i in row]), torch.tensor([len(row) for row in ids])


def pretrain_encoder(
    *,
    tower: GlmAsrEncoder,
    extractor: WhisperFeatureExtractor,
    tokenizer: PreTrainedTokenizerBase,
    clips: Sequence[np.ndarray],
    texts: Sequence[str],
    steps: int,
    batch_size: int = 24,
    learning_rate: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> nn.Linear:
    """Train `tower` in place with character + BPE CTC on (clips, texts); returns the character head.

    clips: 16 kHz float32 arrays; texts: their lower-case transcripts. Steps run over length-bucketed batches.
    The returned head only serves to measure held-out CER (`greedy_transcripts`); it is never saved: the
    projector learns from the tower's hidden states.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    hidden = tower.config.hidden_size
    char_head = nn.Linear(hidden, len(CHARS) + 1)
    bpe_head = nn.Linear(hidden, len(tokenizer) + 1)
    mels = log_mel(clips, extractor)
    char_ids = [[CHARS.index(c) + 1 for c in text] for text in texts]
    bpe_ids = [[i + 1 for i in tokenizer(text, add_special_tokens=False).input_ids] for text in texts]
    params = [*tower.parameters(), *char_head.parameters(), *bpe_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    tower.train()
    batches = endless_batches([m.shape[-1] for m in mels], batch_size=batch_size, rng=rng)
    start = time.perf_counter()
    for step, batch in zip(range(1, steps + 1), batches, strict=False):
        features, lengths = pad_features([mels[i] for i in batch])
        states = encode(tower, spec_augment(features, rng), lengths)  # [B, T_enc, C]
        loss = torch.zeros(())
        for head, ids in ((char_head, char_ids), (bpe_head, bpe_ids)):
            log_probs = head(states).log_softmax(-1).transpose(0, 1)  # [T_enc, B, V]
            targets, target_lengths = _targets([ids[i] for i in batch])
            loss = loss + F.ctc_loss(log_probs, targets, lengths, target_lengths, zero_infinity=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            elapsed = time.perf_counter() - start
            log(
                f"encoder step {step}/{steps} | ctc {loss.item():.3f} | grad norm {grad_norm:.2f} | "
                f"lr {schedule.get_last_lr()[0]:.2e} | {elapsed:.0f}s"
            )
    tower.eval()
    return char_head.eval()


@torch.no_grad()
def greedy_transcripts(
    *, tower: GlmAsrEncoder, head: nn.Linear, extractor: WhisperFeatureExtractor, clips: Sequence[np.ndarray]
) -> list[str]:
    """Greedy CTC decoding with a character head (for checking the pretraining; not shipped)."""
    out = []
    for mel in log_mel(clips, extractor):
        features, lengths = pad_features([mel])
        ids = head(encode(tower, features, lengths))[0].argmax(-1).tolist()
        chars = [CHARS[i - 1] for j, i in enumerate(ids) if i != 0 and (j == 0 or ids[j - 1] != i)]
        out.append("".join(chars))
    return out
