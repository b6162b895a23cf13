"""Audio encoders behind one interface: only the audio tower is loaded, frozen, in eval mode.

`GlmAsrEncoder` (zai-org/GLM-ASR-Nano-2512's tower: 128 mel, stride 2 -> 50 Hz, any length up to 30 s) is the
default; a Whisper encoder works through the same interface. Both checkpoints hold a whole speech-LLM; the
key mappings below select only the tower's weights, so the 1.5B LLM beside it is never materialised.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import GlmAsrEncoder, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from tiny_audio.errors import UserError

# Where each encoder's tower sits inside its full speech-LLM checkpoint: the key prefixes on disk and as the model
# names them in memory. Only these tensors are fetched (hub.download_model_part) and loaded (key mapping below).
TOWER_PREFIXES: dict[str, tuple[str, ...]] = {
    "glmasr": ("audio_tower.", "model.audio_tower."),
    "whisper": ("model.encoder.",),
}


def tower_key_mapping(kind: Literal["glmasr", "whisper"]) -> dict[str, str]:
    """transformers' `key_mapping` that strips the tower's prefix, so a tower class loads it from the full model."""
    alternatives = "|".join(re.escape(prefix) for prefix in sorted(TOWER_PREFIXES[kind], key=len, reverse=True))
    return {f"^(?:{alternatives})": ""}


WHISPER_FRAMES = 3000  # Whisper's position table covers exactly 30 s of 10 ms frames


class AudioEncoder(nn.Module):
    """features [B, n_mels, T_mel] + frame lengths [B] -> hidden [B, T_enc, C] + lengths [B] (T_enc = ceil(T/2))."""

    def __init__(
        self, *, tower: nn.Module, kind: Literal["glmasr", "whisper"], attn_implementation: str = "sdpa"
    ) -> None:
        super().__init__()
        self.tower = tower
        self.kind = kind
        self.attn_implementation = attn_implementation
        config = tower.config
        self.hidden_size: int = config.hidden_size if kind == "glmasr" else config.d_model
        self.num_mel_bins: int = config.num_mel_bins
        self.tower.requires_grad_(False)
        self.tower.eval()

    def train(self, mode: bool = True) -> AudioEncoder:
        # Frozen: dropout and friends stay off whatever the trainer asks.
        return super().train(False)

    @staticmethod
    def output_lengths(frame_lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(frame_lengths + 1, 2, rounding_mode="floor")

    def forward(
        self, features: torch.Tensor, frame_lengths: torch.Tensor, *, mask: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mask=False: every frame attends to every other, padding included (as GLM-ASR's processor feeds it)."""
        lengths = self.output_lengths(frame_lengths)
        if self.kind == "whisper":
            n_frames = features.shape[-1]
            features = nn.functional.pad(features, (0, WHISPER_FRAMES - n_frames))
            hidden = self.tower(features).last_hidden_state[:, : (n_frames + 1) // 2]
            return hidden, lengths
        t_enc = (features.shape[-1] + 1) // 2
        valid = torch.arange(t_enc, device=features.device)[None, :] < lengths[:, None]  # [B, T_enc]
        attention_mask = self._attention_mask(valid, features.dtype) if mask else None
        hidden = self.tower(features, attention_mask=attention_mask).last_hidden_state
        return hidden, lengths

    def _attention_mask(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # GlmAsrEncoder applies no mask by itself: without one, real frames attend to padding and a padded batch
        # encodes differently from the same clip alone (a train/inference mismatch).
        if self.attn_implementation == "flash_attention_2":
            return valid.long()  # 2-D padding mask: flash-attn unpads
        mask = valid[:, None, None, :]  # [B, 1, 1, T_enc]
        if self.attn_implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=valid.device).masked_fill(~mask, torch.finfo(dtype).min)


def load_encoder(
    path: str | Path,
    *,
    kind: Literal["glmasr", "whisper"] = "glmasr",
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple[AudioEncoder, WhisperFeatureExtractor]:
    """Load only the audio tower from a local checkpoint directory, plus its feature extractor."""
    tower_class = GlmAsrEncoder if kind == "glmasr" else WhisperEncoder
    tower, info = tower_class.from_pretrained(
        str(path),
        key_mapping=tower_key_mapping(kind),
        output_loading_info=True,
        attn_implementation=attn_implementation,
        dtype=dtype,
    )
    # from_pretrained fills keys it cannot find with random values and only logs it: that would train a
    # projector on noise. Refuse instead.
    missing = [k for k in info["missing_keys"] if "rotary_emb" not in k]
    if missing:
        raise UserError(
            f"{path} holds no {kind} audio tower weights for {len(missing)} parameters (e.g. {missing[0]}); "
            f"check model.encoder_id and model.encoder_type"
        )
    extractor = WhisperFeatureExtractor.from_pretrained(str(path))
    if extractor.feature_size != tower.config.num_mel_bins:
        raise UserError(
            f"{path}: the feature extractor makes {extractor.feature_size} mel bins but the encoder expects "
            f"{tower.config.num_mel_bins}"
        )
    return AudioEncoder(tower=tower, kind=kind, attn_implementation=attn_implementation), extractor
