"""SpecAugment: random time stretches and frequency bands of the log-mel features set to zero, while training.

Masks are drawn from torch's global CPU generator, whose state every checkpoint saves per process, so a resumed
run masks exactly as the uninterrupted one would have. Time masks fall inside each clip's own frames, never in its
padding.
"""

from __future__ import annotations

import torch
from torch import nn


class SpecAugment(nn.Module):
    """features [B, n_mels, T] + valid frames [B] -> features with masks applied (a new tensor)."""

    def __init__(self, *, time_masks: int, time_mask_frames: int, freq_masks: int, freq_mask_bins: int) -> None:
        super().__init__()
        self.time_masks, self.time_mask_frames = time_masks, time_mask_frames
        self.freq_masks, self.freq_mask_bins = freq_masks, freq_mask_bins

    def forward(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        batch, bins, frames = features.shape
        lengths = frame_lengths.cpu().clamp(min=1)  # [B]
        time = _bands(self.time_masks, self.time_mask_frames, size=lengths, total=frames)  # [B, T]
        freq = _bands(self.freq_masks, self.freq_mask_bins, size=torch.full((batch,), bins), total=bins)  # [B, F]
        masked = time[:, None, :] | freq[:, :, None]  # [B, F, T]
        return features.masked_fill(masked.to(features.device), 0.0)


def _bands(count: int, widest: int, *, size: torch.Tensor, total: int) -> torch.Tensor:
    """[B, total] bool: per row, `count` bands of a random width in [0, widest] (at most the row's `size`) placed
    uniformly inside its first `size` positions."""
    batch = size.shape[0]
    if count == 0 or widest == 0:
        return torch.zeros(batch, total, dtype=torch.bool)
    limit = torch.minimum(size, torch.tensor(widest))[:, None]  # [B, 1]
    width = (torch.rand(batch, count) * (limit + 1)).floor().long()  # [B, count], in [0, limit]
    start = (torch.rand(batch, count) * (size[:, None] - width + 1)).floor().long()  # in [0, size - width]
    position = torch.arange(total)[None, None, :]  # [1, 1, total]
    inside = (position >= start[..., None]) & (position < (start + width)[..., None])  # [B, count, total]
    return inside.any(dim=1)
