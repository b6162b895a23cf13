"""The course's baseline projector: stack 4 frames, then a 2-layer MLP into the decoder's embedding space."""

from __future__ import annotations

import torch
from torch import nn

from tiny_audio.model.projectors.common import FeedForward, OutputScale, stack_frames

HIDDEN_DIM = 2048  # the course's width: ~12.6M parameters for GLM-ASR (1280) -> Qwen3-0.6B (1024)


class MLPProjector(nn.Module):
    """features [B, T, C] -> embeddings [B, T // stack, D], aux_loss (always 0).

    ~12.6M parameters for GLM-ASR (C=1280) -> Qwen3-0.6B (D=1024) with stack 4 and hidden 2048.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        stack: int = 4,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        target_rms: float | None = None,
    ) -> None:
        super().__init__()
        self.stack = stack
        hidden = hidden_dim or HIDDEN_DIM
        self.ffn = FeedForward(in_dim=in_dim * stack, hidden_dim=hidden, out_dim=out_dim, dropout=dropout)
        self.scale = OutputScale(dim=out_dim, target_rms=target_rms)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = stack_frames(features, self.stack)  # [B, T', stack*C]
        x = self.scale(self.ffn(x))  # [B, T', D]
        return x, x.new_zeros(())
