"""`tiny-audio compare-padding`: how far the cheap way of feeding the encoder is from GLM-ASR's own.

The trainer pads a batch to its longest clip and masks the padding (`model.encoder_padding=batch`); GLM-ASR's
processor pads every clip to 30 s and gives the tower no mask (`window`). This loads only the encoder's tower,
encodes held-out clips of the experiment both ways, and prints the cosine similarity of the two outputs over
each clip's real frames, with the time each way took. Values near 1 mean the projector sees the same thing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from tiny_audio.config import Config
from tiny_audio.data import build_eval_set
from tiny_audio.errors import UserError
from tiny_audio.model.encoder import TOWER_PREFIXES, AudioEncoder, load_encoder
from tiny_audio.model.features import LogMel
from tiny_audio.model.loading import resolve_model_path
from tiny_audio.precision import Precision

log = logging.getLogger("tiny_audio")


@dataclass
class PaddingComparison:
    similarities: list[float]  # one per clip: mean cosine similarity over its real frames
    seconds: list[float]  # clip durations
    batch_s: float  # encoder time, batch padding with a mask
    window_s: float  # encoder time, 30 s windows without a mask

    def render(self) -> str:
        lines = [
            f"clip {i}: {s:5.1f} s  cosine {c:.4f}"
            for i, (s, c) in enumerate(zip(self.seconds, self.similarities, strict=True))
        ]
        mean = sum(self.similarities) / len(self.similarities)
        lines.append(
            f"{len(self.similarities)} clips: cosine mean {mean:.4f}, min {min(self.similarities):.4f} | encoder "
            f"time: batch padding {self.batch_s:.2f} s, 30 s windows {self.window_s:.2f} s "
            f"({self.window_s / max(self.batch_s, 1e-9):.1f}x)"
        )
        return "\n".join(lines)


def compare_padding(cfg: Config, *, samples: int, token: str | None, device: torch.device) -> PaddingComparison:
    """Encode `samples` held-out clips of `cfg` both ways; see the module docstring."""
    if cfg.data.eval is None:
        raise UserError("compare-padding reads the experiment's data.eval clips, and it has none")
    if cfg.model.encoder_type != "glmasr":
        raise UserError("compare-padding compares GLM-ASR's two ways of padding; a Whisper encoder always pads to 30 s")
    m = cfg.model
    path = resolve_model_path(m.encoder_id, revision=m.encoder_revision, token=token, only=TOWER_PREFIXES["glmasr"])
    precision = Precision.resolve(cfg.training.precision, device_type=device.type)
    encoder, extractor = load_encoder(
        path, kind="glmasr", attn_implementation=m.attn_implementation, dtype=precision.frozen_dtype
    )
    encoder, log_mel = encoder.to(device), LogMel(extractor=extractor).to(device)
    data = cfg.data.model_copy(update={"eval_samples": samples, "eval_wer_samples": 0})
    batches = build_eval_set(data=data, batch_size=cfg.training.batch_size).batches
    similarities, seconds, batch_s, window_s = [], [], 0.0, 0.0
    with torch.no_grad(), precision.context(device.type):
        for batch in batches:
            audio, lengths = batch.audio.to(device), batch.audio_lengths.to(device)
            start = time.perf_counter()
            trimmed, valid = _encode(encoder, log_mel, audio, lengths, window=False)
            batch_s += _synced(start, device)
            start = time.perf_counter()
            windowed, _ = _encode(encoder, log_mel, audio, lengths, window=True)
            window_s += _synced(start, device)
            for i, n in enumerate(valid.tolist()):
                cosine = nn.functional.cosine_similarity(trimmed[i, :n].float(), windowed[i, :n].float(), dim=-1)
                similarities.append(float(cosine.mean()))
                seconds.append(float(lengths[i]) / log_mel.sampling_rate)
    return PaddingComparison(similarities=similarities, seconds=seconds, batch_s=batch_s, window_s=window_s)


def _encode(
    encoder: AudioEncoder, log_mel: LogMel, audio: torch.Tensor, lengths: torch.Tensor, *, window: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's states [B, T_enc, C] and valid frames [B], fed as `ASRModel.features` feeds it."""
    features, frames = log_mel.windowed(audio, lengths) if window else log_mel(audio, lengths)
    return encoder(features.to(_dtype(encoder)), frames, mask=not window)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _synced(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
