"""MOSA-Base (Mixture of Simple Adapters, arXiv:2508.18998) as the course builds it: a dense mixture in which every
adapter contributes to every token, weighted by a small router that reads the token's frames averaged."""

from __future__ import annotations

import torch
from torch import nn

from tiny_audio.model.projectors.common import FeedForward, OutputScale, stack_frames

HIDDEN_DIM = 4096  # each adapter's hidden width in MOSA-Base


class MOSAProjector(nn.Module):
    """features [B, T, C] -> embeddings [B, T // stack, D], aux_loss (0: a dense mixture has nothing to balance).

    For each token (a group of S = `stack` frames):
        weights = softmax(Linear(router_hidden -> E)(ReLU(Linear(C -> router_hidden)(mean of the S frames))))
        out     = sum_e weights_e * adapter_e(the S frames stacked)
        adapter = Linear(S*C -> hidden) -> GELU -> Linear(hidden -> D)
    The router sees the frames' mean (C wide), the adapters the frames side by side (S*C wide). ~118.1M parameters
    for GLM-ASR (C=1280) -> Qwen3-1.7B (D=2048) with 4 adapters, hidden 4096 and a 512-wide router.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        stack: int = 4,
        hidden_dim: int | None = None,
        num_experts: int = 4,
        router_hidden_dim: int = 512,
        dropout: float = 0.0,
        target_rms: float | None = None,
    ) -> None:
        super().__init__()
        self.stack = stack
        self.router = nn.Sequential(
            nn.Linear(in_dim, router_hidden_dim), nn.ReLU(), nn.Linear(router_hidden_dim, num_experts)
        )
        hidden = hidden_dim or HIDDEN_DIM
        self.experts = nn.ModuleList(
            FeedForward(in_dim=in_dim * stack, hidden_dim=hidden, out_dim=out_dim, dropout=dropout)
            for _ in range(num_experts)
        )
        self.scale = OutputScale(dim=out_dim, target_rms=target_rms)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = stack_frames(features, self.stack)  # [B, T', S*C]
        pooled = x.unflatten(-1, (self.stack, -1)).mean(dim=-2)  # [B, T', C]: each token's frames averaged
        weights = self.router(pooled).float().softmax(dim=-1).to(x.dtype)  # [B, T', E]
        out = sum(weights[..., e, None] * expert(x) for e, expert in enumerate(self.experts))  # [B, T', D]
        return self.scale(out), x.new_zeros(())
