"""Pieces every projector shares: frame stacking, the expert MLP, and optional output scaling."""

from __future__ import annotations

import torch
from torch import nn


def stack_frames(features: torch.Tensor, stack: int) -> torch.Tensor:
    """[B, T, C] -> [B, T // stack, stack * C]: consecutive frames side by side (50 Hz -> 12.5 Hz for 4).

    A trailing partial group is dropped, as GLM-ASR's own adapter does.
    """
    batch, frames, channels = features.shape
    frames = frames // stack * stack
    return features[:, :frames].reshape(batch, frames // stack, stack * channels)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear: [..., in_dim] -> [..., out_dim]."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class OutputScale(nn.Module):
    """RMS-normalise each output token, then scale by a learnable gain starting at the decoder embeddings' RMS.

    On with `projector.match_embedding_rms`; otherwise (target_rms None) the identity, as the course's projectors
    have no such scaling.
    """

    def __init__(self, *, dim: int, target_rms: float | None) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6) if target_rms is not None else None
        if self.norm is not None:
            nn.init.constant_(self.norm.weight, target_rms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm is None else self.norm(x)
