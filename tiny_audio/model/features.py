"""Log-mel features computed in torch on the training device, batched.

Numerically the same recipe as transformers' `WhisperFeatureExtractor` (which GLM-ASR uses with 128 mel bins):
hann-window STFT, power spectrum, slaney mel filters, log10, dynamic range clamped to 8 (per clip), rescaled.
Workers only decode and resample; the STFT runs here, on the GPU when there is one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import WhisperFeatureExtractor

WINDOW_SECONDS = 30.0  # the window GLM-ASR's and Whisper's encoders were trained on


class LogMel(nn.Module):
    """audio [B, S] (16 kHz, zero-padded) + lengths [B] -> features [B, n_mels, T] + frame lengths [B].

    T = S // hop, rounded up to a multiple of `multiple` (at least 2: the encoder's stride-2 conv then maps
    padded and unpadded clips to the same frames); frames past a clip's length are zero, so padding never leaks
    into real frames. The model asks for 2 x the projector's frame stack, so the encoder's output always splits
    into whole groups: one compiled graph then serves every batch length, where a trailing partial group would
    make torch.compile build a second one. The extra frames (under 0.1 s per batch) are masked like any padding.
    """

    def __init__(self, *, extractor: WhisperFeatureExtractor, multiple: int = 2) -> None:
        super().__init__()
        if multiple % 2:
            raise ValueError(f"LogMel(multiple={multiple}): the encoder's stride-2 conv needs an even multiple")
        self.multiple = multiple
        self.n_fft = extractor.n_fft
        self.hop_length = extractor.hop_length
        self.sampling_rate = extractor.sampling_rate
        self.num_mel_bins = extractor.feature_size
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.register_buffer("mel_filters", torch.as_tensor(extractor.mel_filters, dtype=torch.float32).T, False)

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames = audio.shape[-1] // self.hop_length
        # Trailing zeros (as Whisper's pad-to-30s has) so a clip's last frames see zeros after it whether it is
        # alone or followed by batch padding: otherwise the STFT's reflect padding makes them differ.
        audio = nn.functional.pad(audio.float(), (0, self.n_fft // 2))
        stft = torch.stft(audio, self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = (stft[..., :frames].abs() ** 2).contiguous()  # [B, F, S // hop]
        log_spec = torch.clamp(self.mel_filters @ power, min=1e-10).log10()  # [B, n_mels, T]
        frame_lengths = torch.div(lengths, self.hop_length, rounding_mode="floor").clamp(min=1)
        valid = torch.arange(log_spec.shape[-1], device=audio.device)[None, :] < frame_lengths[:, None]  # [B, T]
        # The dynamic range is taken over a clip's own frames only, so padding cannot change it.
        peak = log_spec.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
        log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        log_spec = log_spec * valid[:, None, :]
        log_spec = nn.functional.pad(log_spec, (0, -log_spec.shape[-1] % self.multiple))
        return log_spec, frame_lengths

    @torch.no_grad()
    def windowed(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As Whisper's feature extractor (GLM-ASR's processor) does it: every clip zero-padded to the 30 s window
        and its log-mel taken over the whole window, so padded frames carry the clip's silence floor, not zeros.
        Returns features [B, n_mels, 3000] and each clip's own frames [B]."""
        window = int(WINDOW_SECONDS * self.sampling_rate)
        audio = nn.functional.pad(audio, (0, window - audio.shape[-1]))
        features, _ = self(audio, torch.full_like(lengths, window))
        return features, torch.div(lengths, self.hop_length, rounding_mode="floor").clamp(min=1)
