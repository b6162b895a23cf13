"""Projector registry: a name in the config -> the class that builds it.

Every projector follows one contract: `forward(features[B, T, C], mask[B, T'] | None) -> (embeddings[B, T', D],
aux_loss)` with T' = T // stack; aux_loss is a scalar added to the training loss (0 where nothing is balanced).
"""

from __future__ import annotations

from torch import nn

from tiny_audio.config import PROJECTOR_SETTINGS, ProjectorConfig
from tiny_audio.model.projectors.mlp import MLPProjector
from tiny_audio.model.projectors.moe import MoEProjector
from tiny_audio.model.projectors.mosa import MOSAProjector

PROJECTORS: dict[str, type[nn.Module]] = {"mlp": MLPProjector, "mosa": MOSAProjector, "moe": MoEProjector}


def build_projector(cfg: ProjectorConfig, *, in_dim: int, out_dim: int, target_rms: float | None) -> nn.Module:
    """The registered class of `cfg.type`, given the settings that type reads (`PROJECTOR_SETTINGS`) as keywords."""
    settings = {name: getattr(cfg, name) for name in PROJECTOR_SETTINGS[cfg.type]}
    return PROJECTORS[cfg.type](
        in_dim=in_dim, out_dim=out_dim, target_rms=target_rms if cfg.match_embedding_rms else None, **settings
    )
