"""Several processes (and machines) training as one: the accelerator, DeepSpeed's configuration, the world size a
launch asked for, the agreements every rank must reach on the same step, and a clean teardown.

One process on one machine needs none of this beyond `make_accelerator`; the rest only matters when
`docker/start.sh` launches several (accelerate on CUDA, gloo on CPU).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list

from tiny_audio.config import DEEPSPEED_DIR, Config
from tiny_audio.errors import ConfigError, UserError
from tiny_audio.precision import Precision

# The launcher (docker/start.sh) exports how many processes it asked for, over every machine: a launch that
# silently collapsed to one process is then an error instead of a slow run that looks fine.
ASKED_WORLD_SIZE_VAR = "TINY_AUDIO_WORLD_SIZE"


def asked_world_size(environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ) if environ is None else environ
    asked = 1
    for name in ("WORLD_SIZE", ASKED_WORLD_SIZE_VAR):
        value = environ.get(name, "").strip()
        if value:
            try:
                asked = max(asked, int(value))
            except ValueError:
                raise UserError(f"{name} must be a whole number, got {value!r}") from None
    return asked


def check_world_size(actual: int, environ: dict[str, str] | None = None) -> None:
    """UserError when more processes were asked for than joined the run (e.g. a CPU launch without a backend)."""
    asked = asked_world_size(environ)
    if asked > actual:
        raise UserError(
            f"{asked} processes were asked for but this run has {actual}: the launch did not form a process "
            "group (on CPU use `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N` or "
            "`torchrun --nproc_per_node N`; on GPUs check that every GPU is visible)"
        )


def deepspeed_config(cfg: Config, *, world_size: int, grad_accum: int, cuda: bool) -> dict[str, Any]:
    """The experiment's DeepSpeed JSON (configs/deepspeed/<name>.json or a path) with the run's batch settings."""
    t = cfg.training
    name = t.deepspeed or ""
    path = Path(name) if name.endswith(".json") else DEEPSPEED_DIR / f"{name}.json"
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"training.deepspeed: cannot read {path}: {exc}") from None
    ds["train_micro_batch_size_per_gpu"] = t.batch_size
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = t.batch_size * grad_accum * world_size
    ds["gradient_clipping"] = t.max_grad_norm
    # DeepSpeed's bf16 mode is its autocast: the engine keeps fp32 master weights in the optimizer
    precision = Precision.resolve(t.precision, device_type="cuda" if cuda else "cpu")
    ds["bf16"] = {"enabled": cuda and precision.autocast}
    ds.pop("fp16", None)
    return ds


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    mixed = Precision.resolve(cfg.training.precision, device_type="cuda" if cuda else "cpu").accelerate_mixed_precision
    # gloo lets several CPU processes train together (tests, and machines without GPUs); a single process
    # must not ask for a process group at all.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    handlers = [InitProcessGroupKwargs(backend="gloo")] if world_size > 1 and not cuda else []
    plugin = None
    if cfg.training.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        accum = gradient_accumulation(cfg, world_size)
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world_size=world_size, grad_accum=accum, cuda=cuda))
    # cpu=True (or ACCELERATE_USE_CPU, which a CPU launch through `accelerate launch --multi_gpu` needs) would
    # silently drop the DeepSpeed plugin; without a GPU DeepSpeed picks its CPU accelerator itself
    cpu = not cuda and plugin is None
    if plugin is not None:
        os.environ.pop("ACCELERATE_USE_CPU", None)
    accelerator = Accelerator(mixed_precision=mixed, cpu=cpu, kwargs_handlers=handlers, deepspeed_plugin=plugin)
    if plugin is not None and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise UserError(
            f"training.deepspeed={cfg.training.deepspeed} was asked for but accelerate set up "
            f"{accelerator.distributed_type.value}: check that deepspeed is installed and importable"
        )
    return accelerator


def uses_deepspeed(acc: Accelerator) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED


def gradient_accumulation(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step so that the global batch is what the config says, whatever the GPUs."""
    micro = cfg.training.batch_size
    global_batch = cfg.training.global_batch_size or micro * world_size
    per_step = micro * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"training.global_batch_size={global_batch} is not a multiple of training.batch_size x processes "
            f"= {micro} x {world_size}; choose a global batch size divisible by {per_step}"
        )
    return global_batch // per_step


def describe_processes(cfg: Config, accelerator: Accelerator, grad_accum: int) -> str:
    """`processes: 2 (MULTI_GPU) | micro-batch 16 | accumulation 1 | global batch 32`, for the start-up log."""
    kind = (
        f"DeepSpeed {cfg.training.deepspeed}"
        if uses_deepspeed(accelerator)
        else ("single process" if accelerator.num_processes == 1 else accelerator.distributed_type.value)
    )
    batch = cfg.training.batch_size
    note = " (accumulation set so the global batch is training.global_batch_size)"
    note = note if cfg.training.global_batch_size else ""
    return (
        f"processes: {accelerator.num_processes} ({kind}) | micro-batch {batch} | accumulation {grad_accum} | "
        f"global batch {batch * accelerator.num_processes * grad_accum}{note}"
    )


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is set on any rank (a stop signal): every rank then stops after the SAME step, or the ones
    that went on would wait forever for the others in the next collective."""
    if accelerator.num_processes == 1:
        return flag
    total = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(total, reduction="sum").item() > 0)


def sum_over_ranks(accelerator: Accelerator, counts: list[int | float]) -> list[int]:
    """Whole numbers counted on each rank (samples kept, dropped), summed over every rank: a collective."""
    if accelerator.num_processes == 1:
        return [int(c) for c in counts]
    total = torch.tensor(counts, dtype=torch.float64, device=accelerator.device)
    return [int(v) for v in accelerator.reduce(total, reduction="sum").tolist()]


def main_decides(accelerator: Accelerator, value: Any) -> Any:
    """The main process's `value`, on every rank (a reason to end the run: its clock decides for all)."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box)
    return box[0]


def release_ddp(run: Any) -> None:
    """Free the DDP wrapper `run.model` while the process group still exists, before end_training destroys it; the
    run keeps `run.raw`, the model itself.

    DDP's C++ reducer holds the process group. Freed last (after destroy_process_group), the reducer is the
    group's last owner and destroys it while holding the GIL; a gloo worker thread still releasing a finished
    collective's tensors then waits for that GIL forever, and a run that has saved everything never exits (seen
    once in CI, rank 0 stuck in ~ProcessGroupGloo). Freed here, the reducer only drops a reference, and
    destroy_process_group, which releases the GIL, ends the group.
    """
    if not isinstance(run.model, torch.nn.parallel.DistributedDataParallel):
        return
    run.accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
    run.model = run.raw
    gc.collect()  # the wrapper sits in reference cycles
