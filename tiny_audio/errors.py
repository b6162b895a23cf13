"""Errors a user can cause: the CLI prints them as one line and exits with their code, no traceback.

Exit codes: 2 a mistake to fix (config, token, a full or read-only volume, ...); 3 out of GPU memory (a setting
to lower). Errors the code causes keep their traceback (exit 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EXIT_OUT_OF_MEMORY = 3


class UserError(Exception):
    """A mistake the user can fix (bad config, missing token, unreadable input). Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """The experiment configuration is invalid."""


class DiskFull(UserError):
    """The volume (or a quota) has no room for what the run must write; the message names the folder, the free
    space and what was needed. Exit code 2: free space or use a larger volume."""


class OutOfGpuMemory(UserError):
    """A training step needed more GPU memory than the card has. Its own exit code (3), so a launcher can tell
    it from other mistakes: a smaller micro-batch fixes it."""

    exit_code = EXIT_OUT_OF_MEMORY

    @classmethod
    def at_step(
        cls,
        *,
        step: int,
        micro_batch: int,
        global_batch: int | None,
        processes: int,
        last_checkpoint: str | None,
        device: torch.device | None = None,
    ) -> OutOfGpuMemory:
        """The one line for an out-of-memory error at `step`: what to set instead and what that keeps.

        global_batch: training.global_batch_size (None: micro-batch x processes, one micro-batch per step).
        device: the GPU, named in the message with its memory.
        """
        on = f" on {_card(device)}" if device is not None and device.type == "cuda" else ""
        what = f"out of GPU memory at step {step} with a micro-batch of {micro_batch}{on}"
        kept = (
            f"the last checkpoint {last_checkpoint} is intact and a restart resumes from it"
            if last_checkpoint
            else "no checkpoint was saved yet"
        )
        smaller = _smaller_micro_batch(micro_batch, global_batch or micro_batch * processes, processes)
        if smaller is None:
            fix = "a micro-batch of 1 does not fit: lower data.max_seconds or use a GPU with more memory"
        elif global_batch is not None:
            accumulation = global_batch // (smaller * processes)
            fix = (
                f"set training.batch_size={smaller} (training.global_batch_size={global_batch} is kept through "
                f"gradient accumulation: {accumulation} micro-batches per step)"
            )
        else:
            keep = micro_batch * processes
            fix = (
                f"set training.batch_size={smaller} and training.global_batch_size={keep} to keep the global batch "
                f"of {keep} ({keep // (smaller * processes)} micro-batches per step)"
            )
        return cls(f"{what}: {fix}; {kept}")


def _card(device: torch.device) -> str:
    import torch

    properties = torch.cuda.get_device_properties(device)
    return f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB)"


def _smaller_micro_batch(micro: int, global_batch: int, processes: int) -> int | None:
    """The largest micro-batch at most half of `micro` that still divides the global batch; None when none."""
    for candidate in range(micro // 2, 0, -1):
        if global_batch % (candidate * processes) == 0:
            return candidate
    return None
