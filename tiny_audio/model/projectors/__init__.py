"""Projector registry: a name in the config -> the class that builds it.

Every projector follows one contract: `forward(features[B, T, C], mask[B, T'] | None) -> (embeddings[B, T', D],
aux_loss)` with T' = T // stack; aux_loss is a scalar added to the training loss (0 where nothing is balanced).
"""

from __future__ import annotations

from torch import nn

from tiny_audio.config import ProjectorConfig
from tiny_audio.model.projectors.mlp import MLPProjector
from tiny_audio.model.projectors.moe import MoEProjector
from tiny_audio.model.projectors.mosa import MOSAProjector

PROJECTORS: dict[str, type[nn.Module]] = {"mlp": MLPProjector, "mosa": MOSAProjector, "moe": MoEProjector}


def build_projector(cfg: ProjectorConfig, *, in_dim: int, out_dim: int, target_rms: float | None) -> nn.Module:
    """Turn the projector section of the config into keyword arguments for the registered class."""
    common = {
        "in_dim": in_dim,
        "out_dim": out_dim,
        "stack": cfg.stack,
        "hidden_dim": cfg.hidden_dim,
        "dropout": cfg.dropout,
        "target_rms": target_rms if cfg.match_embedding_rms else None,
    }
    if cfg.type == "mosa":
        common["num_experts"] = cfg.num_experts
    if cfg.type == "moe":
        common |= {
            "num_experts": cfg.num_experts,
            "top_k": cfg.top_k,
            "aux_loss_coef": cfg.aux_loss_coef,
            "z_loss_coef": cfg.z_loss_coef,
        }
    return PROJECTORS[cfg.type](**common)
