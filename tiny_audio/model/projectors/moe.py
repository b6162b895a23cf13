"""The course's sparse mixture of experts: a temporal convolution, then one shared expert for every token plus
the top-k of several routed experts, chosen by sigmoid router scores.

Tokens are dispatched by sorting them on their expert id, so each expert runs ONE matmul over its contiguous
group (a loop over experts, never over tokens). Every expert runs in every step, on an empty group when no token
chose it: its parameters then get zero gradients instead of none, which DDP requires of every parameter in every
step. A load-balancing loss and a router z-loss keep the router from collapsing onto one expert; both are returned
as the auxiliary loss and logged.
"""

from __future__ import annotations

import torch
from torch import nn

from tiny_audio.model.projectors.common import FeedForward, OutputScale, stack_frames

SHARED_OUTPUT_GAIN = 0.5  # orthogonal init gains of the output layers: the shared expert starts at half scale,
ROUTED_OUTPUT_GAIN = 0.01  # the routed ones near zero, so the mixture starts as the shared expert alone


class MoEProjector(nn.Module):
    """features [B, T, C] (+ mask [B, T // stack] of real tokens) -> embeddings [B, T // stack, D], aux_loss.

        frames = features + depthwise_conv_k3(features)         temporal context from each frame's neighbours
        x      = RMSNorm(frames stacked by S)                   [N, S*C], N = B * T // S tokens
        scores = sigmoid(router(x))                             [N, E], each in (0, 1), independent of the others
        out    = shared(x) + sum over the top-k e of scores_e / sum(top-k scores) * expert_e(x)
        aux    = aux_loss_coef * E * sum_e (mean score_e - mean over experts)^2 + z_loss_coef * mean(logsumexp^2)

    Each expert is Linear(S*C -> hidden) -> GELU -> Linear(-> D), hidden = S*C by default. ~183.6M parameters for
    GLM-ASR (C=1280) -> Qwen3-1.7B (D=2048) with stack 4 and 4 routed experts. The losses and the expert load count
    real tokens only (`mask`); frames past the last real token are zeroed before the convolution, so a clip's
    output does not depend on the padding of its batch.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        stack: int = 4,
        hidden_dim: int | None = None,
        num_experts: int = 4,
        top_k: int = 2,
        aux_loss_coef: float = 0.02,
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
        hidden = hidden_dim or width
        self.temporal_conv = nn.Conv1d(in_dim, in_dim, kernel_size=3, padding=1, groups=in_dim)  # depthwise
        self.norm = nn.RMSNorm(width, eps=1e-8)
        self.router = nn.Linear(width, num_experts, bias=False)
        self.shared = FeedForward(in_dim=width, hidden_dim=hidden, out_dim=out_dim, dropout=dropout)
        self.experts = nn.ModuleList(
            FeedForward(in_dim=width, hidden_dim=hidden, out_dim=out_dim, dropout=dropout) for _ in range(num_experts)
        )
        self.scale = OutputScale(dim=out_dim, target_rms=target_rms)
        self.reset_parameters()
        # Statistics of the last batch's real tokens, for logging.
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)
        self.register_buffer("last_losses", torch.zeros(2), persistent=False)  # balance, z

    def reset_parameters(self) -> None:
        """The course's initialisation: a near-uniform router, orthogonal expert weights."""
        if self.router.weight.is_meta:  # nothing to fill (a count of parameters); spares torch's meta kernels' import
            return
        with torch.no_grad():
            nn.init.normal_(self.router.weight, std=0.02)
            nn.init.orthogonal_(self.shared.fc1.weight)
            nn.init.orthogonal_(self.shared.fc2.weight, gain=SHARED_OUTPUT_GAIN)
            for expert in self.experts:
                nn.init.orthogonal_(expert.fc1.weight)
                nn.init.orthogonal_(expert.fc2.weight, gain=ROUTED_OUTPUT_GAIN)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens = features.shape[0], features.shape[1] // self.stack
        frames = features[:, : tokens * self.stack]  # [B, T'*S, C]
        if mask is not None:
            frames = frames * mask[:, :tokens].repeat_interleave(self.stack, dim=1)[..., None]  # padding -> 0
        frames = frames + self.temporal_conv(frames.transpose(1, 2)).transpose(1, 2)  # [B, T'*S, C]
        flat = self.norm(stack_frames(frames, self.stack)).reshape(batch * tokens, -1)  # [N, S*C]
        logits = self.router(flat).float()  # [N, E]
        scores = logits.sigmoid()
        top_scores, top_e = scores.topk(self.top_k, dim=-1)  # [N, k]
        top_w = top_scores / top_scores.sum(dim=-1, keepdim=True).clamp_min(1e-9)  # each token's k weights sum to 1
        shared = self.shared(flat)  # [N, D]
        out = self.scale(shared + self.dispatch(flat, top_e, top_w.to(shared.dtype)))  # [N, D]

        real = slice(None) if mask is None else mask[:, :tokens].reshape(-1)  # [N] real tokens
        balance, z = self.router_losses(logits[real], scores[real], top_e[real])
        return out.reshape(batch, tokens, -1), self.aux_loss_coef * balance + self.z_loss_coef * z

    def dispatch(self, flat: torch.Tensor, top_e: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """sum over each token's k experts of weight * expert(token): [N, W] -> [N, D].

        The (token, slot) pairs are sorted by expert, so each expert takes one contiguous group; an expert no token
        chose runs on an empty group and so still takes part in the graph (zero gradients, not missing ones).
        """
        expert_ids = top_e.reshape(-1)  # [N*k]
        order = expert_ids.argsort(stable=True)
        token_ids = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(self.top_k)[order]  # [N*k]
        weights = top_w.reshape(-1)[order]  # [N*k]
        counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()  # one host sync per step
        groups = zip(self.experts, token_ids.split(counts), weights.split(counts), strict=True)
        routed = torch.cat([expert(flat[rows]) * w[:, None] for expert, rows, w in groups])  # [N*k, D], sorted
        return routed.new_zeros(flat.shape[0], routed.shape[1]).index_add_(0, token_ids, routed)  # [N, D]

    def router_losses(
        self, logits: torch.Tensor, scores: torch.Tensor, top_e: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The course's balance loss and the router z-loss over the given tokens: logits, scores [n, E], top_e [n, k].

        balance = E * sum_e (p_e - mean_e p_e)^2 with p_e the mean score of expert e: 0 when every expert is scored
        alike on average, growing as the router favours some. z = mean(logsumexp(logits)^2) keeps logits small.
        """
        if logits.shape[0] == 0:
            zero = logits.sum()
            return zero, zero
        p = scores.mean(dim=0)  # [E]
        balance = self.num_experts * (p - p.mean()).square().sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        load = torch.bincount(top_e.reshape(-1), minlength=self.num_experts).float() / top_e.numel()
        self.expert_load.copy_(load.detach())
        self.last_losses.copy_(torch.stack([balance, z]).detach())
        return balance, z

    def metrics(self) -> dict[str, float]:
        """The last batch's share of routed slots per expert (1/E each when balanced) and the two router losses
        before their weights."""
        loads = {f"moe/expert_{i}_load": float(v) for i, v in enumerate(self.expert_load)}
        return loads | {"moe/balance_loss": float(self.last_losses[0]), "moe/z_loss": float(self.last_losses[1])}
