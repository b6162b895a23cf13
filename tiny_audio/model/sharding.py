"""DeepSpeed ZeRO-3 partitions every parameter across ranks: a module's own forward gathers its weights through
hooks, but code that reads a weight directly (the embedding RMS, the fused loss head, saving the projector)
must gather it first. `gathered` does that under ZeRO-3 and nothing otherwise."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether `param` is a ZeRO-3 partitioned parameter (DeepSpeed tags them with `ds_id`)."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter (a ZeRO-3 parameter holds only this rank's slice of them)."""
    return getattr(param, "ds_numel", param.numel())


def gathered(params: Iterable[torch.Tensor], *, modifier_rank: int | None = None) -> AbstractContextManager:
    """Full values of `params` inside the block (a collective: every rank must enter it).

    modifier_rank: the rank whose in-place changes are kept and re-partitioned on exit (None: read only).
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return nullcontext()
    import deepspeed  # only ever reached in a ZeRO-3 run, where it is installed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if modifier_rank is None:
        # Already gathered (a small parameter ZeRO keeps whole, or one a running forward holds): read it as
        # it is; releasing it here would pull it from under the module that uses it. Every rank sees the same
        # statuses, so they all enter the same collective.
        params = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
        if not params:
            return nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
