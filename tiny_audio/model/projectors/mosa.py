"""Dense mixture of adapters: every expert MLP sees every token, mixed by a softmax router."""

from __future__ import annotations

import torch
from torch import nn

from tiny_audio.model.projectors.common import FeedForward, OutputScale, stack_frames


class MOSAProjector(nn.Module):
    """features [B, T, C] -> embeddings [B, T // stack, D], aux_loss (0: nothing to balance in a dense mixture).

    All `num_experts` experts contribute to every token: out = sum_e softmax(router(x))_e * expert_e(x).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        stack: int = 4,
        hidden_dim: int = 1024,
        num_experts: int = 4,
        dropout: float = 0.0,
        target_rms: float | None = None,
    ) -> None:
        super().__init__()
        self.stack = stack
        self.router = nn.Linear(in_dim * stack, num_experts)
        self.experts = nn.ModuleList(
            FeedForward(in_dim=in_dim * stack, hidden_dim=hidden_dim, out_dim=out_dim, dropout=dropout)
            for _ in range(num_experts)
        )
        self.scale = OutputScale(dim=out_dim, target_rms=target_rms)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = stack_frames(features, self.stack)  # [B, T', S*C]
        weights = self.router(x).softmax(dim=-1)  # [B, T', E]
        expert_out = torch.stack([expert(x) for expert in self.experts], dim=-1)  # [B, T', D, E]
        out = (expert_out * weights.unsqueeze(-2)).sum(dim=-1)  # [B, T', D]
        return self.scale(out), out.new_zeros(())
