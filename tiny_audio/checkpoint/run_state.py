"""What the training loop saves and resumes, over every process: the projector's weights (and the decoder's LoRA
adapters in the second stage), the optimizer (each
rank's ZeRO partition under DeepSpeed), the scheduler, every rank's RNG states and data position, and the loop's
own state (step, metrics, tracker run, cost, health), so that a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from tiny_audio.checkpoint.format import RankState, capture_rng, load_torch, read_checkpoint, write_checkpoint
from tiny_audio.checkpoint.store import CheckpointStore, find_checkpoint
from tiny_audio.distributed import uses_deepspeed
from tiny_audio.errors import UserError
from tiny_audio.model.lora import adapter_parameters
from tiny_audio.model.sharding import gathered

log = logging.getLogger("tiny_audio")


@dataclass(frozen=True)
class RunParts:
    """The parts of a training run a checkpoint saves and restores, and where it goes (`store`)."""

    store: CheckpointStore
    accelerator: Accelerator
    projector: torch.nn.Module
    optimizer: Any
    scheduler: Any
    stream: Any
    decoder: torch.nn.Module | None = None  # its LoRA adapters, if any, are saved with the projector

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.projector.parameters(), *adapter_parameters(self.decoder)]


def save_run(
    parts: RunParts,
    *,
    train_state: dict[str, Any],
    config: dict[str, Any],
    model_files: Callable[[Path], None],
    final: bool,
) -> Path | None:
    """Write the checkpoint of `train_state["step"]` and queue its upload; the local folder (main process) or None.

    Every rank takes part: its RNG states and data position (and under DeepSpeed its optimizer partition) are
    gathered to the main process, which writes the one checkpoint. Under ZeRO-3 the projector's weights are
    gathered from every rank's slice first (the files are written inside that block).
    """
    acc, optimizer = parts.accelerator, parts.optimizer
    with gathered(parts.trained_parameters()):
        mine = RankState(rng=capture_rng(), data=parts.stream.state_dict())
        ranks = gather_object([mine]) if acc.num_processes > 1 else [mine]
        optimizer_state: dict[str, Any] | None = None
        if uses_deepspeed(acc):
            part = plain_state(optimizer.optimizer.state_dict())
            optimizer_state = {"deepspeed_ranks": gather_object([part]) if acc.num_processes > 1 else [part]}
        if not acc.is_main_process:
            return None

        def write(directory: Path) -> None:
            write_checkpoint(
                directory,
                projector=parts.projector,
                optimizer=optimizer,
                scheduler=parts.scheduler,
                train_state=train_state,
                data_state=ranks[0].data,
                config=config,
                ranks=ranks,
                optimizer_state=optimizer_state,
                decoder=parts.decoder,
            )

        step = int(train_state["step"])
        path = parts.store.save(step=step, write=write, model_files=model_files, final=final)
    log.info("checkpoint step %d saved to %s", step, path)
    return path


def resume_run(parts: RunParts, *, config: dict[str, Any]) -> dict[str, Any] | None:
    """Restore everything from the store's newest checkpoint, on every rank; its train state (None: no checkpoint)."""
    acc = parts.accelerator
    directory = find_checkpoint(parts.store, acc)
    if directory is None:
        log.info("no checkpoint found: starting a fresh run")
        return None
    deepspeed = uses_deepspeed(acc)
    # (under ZeRO-3 every rank reads the same weights into the gathered projector; rank 0's copy is re-sharded)
    with gathered(parts.trained_parameters(), modifier_rank=0):
        train_state, data_state = read_checkpoint(
            directory,
            projector=parts.projector,
            optimizer=None if deepspeed else parts.optimizer,
            scheduler=parts.scheduler,
            config=config,
            rank=acc.process_index,
            decoder=parts.decoder,
        )
    if deepspeed:
        load_deepspeed_optimizer(parts.optimizer, directory, processes=acc.num_processes)
    parts.stream.load_state_dict(data_state)
    log.info("resumed from %s at step %d", directory, int(train_state["step"]))
    return train_state


def load_deepspeed_optimizer(optimizer: Any, directory: Path, *, processes: int) -> None:
    """ZeRO partitions the optimizer state: every rank takes its own part, which needs the same process count."""
    saved = load_torch(directory / "optimizer.pt")
    parts = saved.get("deepspeed_ranks") if isinstance(saved, dict) else None
    if parts is None:
        raise UserError(
            f"{directory} was not saved under DeepSpeed; its optimizer state cannot be loaded into a ZeRO run "
            "(resume it without training.deepspeed, or set training.resume=false to start fresh)"
        )
    if len(parts) != processes:
        raise UserError(
            f"{directory} was saved by {len(parts)} DeepSpeed processes, this run has {processes}: ZeRO optimizer "
            "state resumes with the same process count"
        )
    zero = optimizer.optimizer
    for part in parts:  # the fp16 loss scaler is left out when saving (see plain_state); ZeRO-3 reads it back
        part.setdefault("loss_scaler", getattr(zero, "loss_scaler", None))
    # fp32 master weights from the checkpoint itself (the model may hold bf16 copies of them)
    zero.load_state_dict(parts, load_from_fp32_weights=True)


def plain_state(value: Any) -> Any:
    """A ZeRO optimizer state with only tensors, numbers, strings and containers, so it loads with
    `torch.load(weights_only=True)`: enums become their values; left out are the loss scaler (an object used by
    fp16 only: bf16 and fp32 runs restore without it) and the parameter slice map (objects describing where
    each parameter lies in the flat buffer, read only by DeepSpeed's "universal" checkpoint conversion)."""
    if isinstance(value, dict):
        return {k: plain_state(v) for k, v in value.items() if k not in ("loss_scaler", "param_slice_mappings")}
    if isinstance(value, list | tuple):
        return type(value)(plain_state(v) for v in value)
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, torch.Tensor | bool | int | float | str):
        return value
    raise TypeError(f"unexpected {type(value).__name__} in the DeepSpeed optimizer state")
