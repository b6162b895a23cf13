"""The optimizer and the learning-rate schedule the config asks for (the course's AdamW, warm-up then cosine)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import get_scheduler

from tiny_audio.config import Config


def build_optimizer(cfg: Config, params: Iterable[torch.nn.Parameter], *, fused: bool) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the projector's); fused=True (CUDA) runs it as one kernel."""
    t = cfg.training
    return torch.optim.AdamW(
        list(params), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, fused=fused
    )


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> Any:
    """Linear warm-up over `warmup_steps`, then cosine (to `min_lr_ratio` of the peak), linear or constant."""
    t = cfg.training
    name = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[t.lr_scheduler]
    extra = {"min_lr_rate": t.min_lr_ratio} if t.lr_scheduler == "cosine" else None
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=t.warmup_steps,
        num_training_steps=t.max_steps,
        scheduler_specific_kwargs=extra,
    )
