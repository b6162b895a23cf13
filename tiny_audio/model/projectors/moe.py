"""Sparse mixture of experts: one shared expert for every token plus top-k routed experts.

Tokens are dispatched by sorting them on their expert id, so each expert runs ONE matmul over its contiguous
group (a loop over experts, never over tokens). A Switch-style load-balancing loss and a router z-loss keep the
router from collapsing onto one expert; both are returned as the auxiliary loss and logged.
"""

from __future__ import annotations

import torch
from torch import nn

from tiny_audio.model.projectors.common import FeedForward, OutputScale, stack_frames


class MoEProjector(nn.Module):
    """features [B, T, C] (+ mask [B, T // stack] of real tokens) -> embeddings [B, T // stack, D], aux_loss."""

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        stack: int = 4,
        hidden_dim: int = 1024,
        num_experts: int = 4,
        top_k: int = 2,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        dropout: float = 0.0,
        target_rms: float | None = None,
    ) -> None:
        super().__init__()
        self.stack = stack
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        width = in_dim * stack
        self.router = nn.Linear(width, num_experts, bias=False)
        self.shared = FeedForward(in_dim=width, hidden_dim=hidden_dim, out_dim=out_dim, dropout=dropout)
        self.experts = nn.ModuleList(
            FeedForward(in_dim=width, hidden_dim=hidden_dim, out_dim=out_dim, dropout=dropout)
            for _ in range(num_experts)
        )
        self.scale = OutputScale(dim=out_dim, target_rms=target_rms)
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)  # last batch, for logging

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = stack_frames(features, self.stack)  # [B, T', W]
        batch, tokens, width = x.shape
        flat = x.reshape(-1, width)  # [N, W]
        logits = self.router(flat).float()  # [N, E]
        probs = logits.softmax(dim=-1)
        top_p, top_e = probs.topk(self.top_k, dim=-1)  # [N, k]
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        routed = self.dispatch(flat, top_e, top_p.to(flat.dtype))  # [N, D]
        out = self.scale(self.shared(flat) + routed).reshape(batch, tokens, -1)  # [B, T', D]

        real = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
        if mask is not None:
            real = mask[:, :tokens].reshape(-1)
        aux = self.balance_loss(probs[real], top_e[real]) * self.aux_loss_coef
        aux = aux + self.z_loss_coef * torch.logsumexp(logits[real], dim=-1).square().mean()
        return out, aux

    def dispatch(self, flat: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's k experts: sort (token, slot) pairs by expert, one matmul per group."""
        expert_ids = top_e.reshape(-1)  # [N*k]
        order = expert_ids.argsort(stable=True)
        token_ids = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(self.top_k)[order]
        weights = top_p.reshape(-1)[order]
        counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()  # one host sync per step
        out = flat.new_zeros(flat.shape[0], self.experts[0].fc2.out_features)
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                rows = token_ids[start : start + count]
                out.index_add_(0, rows, expert(flat[rows]) * weights[start : start + count, None])
            start += count
        return out

    def balance_loss(self, probs: torch.Tensor, top_e: torch.Tensor) -> torch.Tensor:
        """E * sum_e (fraction of routed slots on e) * (mean router probability of e); 1.0 when balanced."""
        if probs.numel() == 0:
            return probs.sum()
        load = torch.bincount(top_e.reshape(-1), minlength=self.num_experts).float() / top_e.numel()
        self.expert_load.copy_(load.detach())
        return self.num_experts * (load * probs.mean(dim=0)).sum()

    def metrics(self) -> dict[str, float]:
        return {f"moe/expert_{i}_load": float(v) for i, v in enumerate(self.expert_load)}
