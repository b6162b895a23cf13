"""The training recipe: setup -> train_loop -> cleanup.

`train_loop` is the whole loop in one function: data -> forward -> loss -> backward -> step -> log -> eval ->
checkpoint. Everything it needs is built once in `setup` and held by a `Run`.
"""

from __future__ import annotations

import enum
import gc
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, gather_object
from transformers import get_scheduler

from tiny_audio.checkpoint import (
    CheckpointStore,
    RankState,
    capture_rng,
    manifest_step,
    read_checkpoint,
    write_checkpoint,
)
from tiny_audio.config import DEEPSPEED_DIR, Config
from tiny_audio.cost import CostMeter, format_usd, start_meter
from tiny_audio.data import DropReason, EvalSet, build_eval_set, build_train_stream
from tiny_audio.errors import ConfigError, OutOfGpuMemory, UserError
from tiny_audio.evaluate import EvalResult, evaluate
from tiny_audio.export import export_model
from tiny_audio.health import EvalWatch
from tiny_audio.hub import RetryPolicy
from tiny_audio.model.asr import ASRModel
from tiny_audio.model.loading import build_model, parameter_report
from tiny_audio.model.sharding import gathered
from tiny_audio.precision import Precision
from tiny_audio.redact import redact
from tiny_audio.signals import EXIT_STOPPED, StopSignal
from tiny_audio.space import check_volume, disk_full_is_one_line, naming_the_file
from tiny_audio.tracking import Tracker, resolve_mode, start_tracker

log = logging.getLogger("tiny_audio")


class TrainingDiverged(UserError):
    """Too many non-finite losses or gradients in a row."""


@dataclass
class Run:
    cfg: Config
    accelerator: Accelerator
    model: ASRModel  # possibly wrapped (DDP); `raw` is the ASRModel itself
    raw: ASRModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: Any
    eval_set: EvalSet
    store: CheckpointStore
    tracker: Tracker
    grad_accum: int
    output_dir: Path
    secrets: list[str]
    meter: CostMeter  # hours and dollars spent, the budget (tiny_audio.cost)
    watch: EvalWatch  # the eval loss's trend: when to think about cancelling (tiny_audio.health)
    step: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # latest eval figures (model card, checkpoint)
    best_wer: float | None = None
    stop: StopSignal = field(default_factory=StopSignal)


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


def setup(cfg: Config, *, output_dir: Path, token: str | None, target: str | None) -> Run:
    check_world_size(int(os.environ.get("WORLD_SIZE", "1")))  # before a process group waits for absent peers
    accelerator = make_accelerator(cfg)
    check_world_size(accelerator.num_processes)
    if accelerator.is_local_main_process:  # this machine's volume: writable, room for the run, before any download
        check_volume(cfg, output_dir=output_dir, token=token)
    is_main = accelerator.is_main_process
    if is_main:
        resolve_mode(cfg.tracking)  # online W&B without a key: an error now, not after loading the models
    meter = start_meter(cfg.budget, ask_runpod=is_main)  # the price, read once, before any download
    secrets = [token] if token else []
    grad_accum = gradient_accumulation(cfg, accelerator.num_processes)
    if is_main:
        log.info("config:\n%s", json.dumps(redact(cfg.to_dict(), secrets=secrets), indent=2))
        log.info(
            "processes: %d (%s) | micro-batch %d | accumulation %d | global batch %d%s",
            accelerator.num_processes,
            f"DeepSpeed {cfg.training.deepspeed}"
            if uses_deepspeed(accelerator)
            else ("single process" if accelerator.num_processes == 1 else accelerator.distributed_type.value),
            cfg.training.batch_size,
            grad_accum,
            cfg.training.batch_size * accelerator.num_processes * grad_accum,
            " (accumulation set so the global batch is training.global_batch_size)"
            if cfg.training.global_batch_size
            else "",
        )

    cuda = accelerator.device.type == "cuda"
    precision = Precision.resolve(cfg.training.precision, device_type=accelerator.device.type)
    model = build_model(cfg, device=accelerator.device, frozen_dtype=precision.frozen_dtype, token=token)
    if is_main:
        for part, trainable, frozen in parameter_report(model):
            log.info("%-9s trainable %12s | frozen %12s", part, f"{trainable:,}", f"{frozen:,}")
        log.info("prompt: %r", model.prompt.render())  # what the decoder reads; <audio> stands for the clip
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]  # the projector's only
    optimizer = torch.optim.AdamW(
        params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, fused=cuda
    )
    scheduler = build_scheduler(cfg, optimizer)
    if t.compile and cuda:
        model.compile_parts(dynamic=True)  # compiles what forward calls, in place: state-dict keys unchanged
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    store = CheckpointStore.open(
        target=target,
        output_dir=output_dir,
        token=token,
        hub=cfg.hub,
        keep=t.keep_checkpoints,
        is_main_process=is_main,
        retry=RetryPolicy(
            attempts=cfg.hub.retry_attempts, initial_s=cfg.hub.retry_initial_s, max_s=cfg.hub.retry_max_s
        ),
    )
    stream = build_train_stream(
        data=cfg.data,
        batch_size=t.batch_size,
        seed=t.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        count_tokens=model.prompt.count_label_tokens,
    )
    eval_set = build_eval_set(data=cfg.data, batch_size=t.batch_size, count_tokens=model.prompt.count_label_tokens)
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        model=wrapped,
        raw=model,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        eval_set=eval_set,
        store=store,
        tracker=None,
        grad_accum=grad_accum,  # type: ignore[arg-type]
        output_dir=output_dir,
        secrets=secrets,
        meter=meter,
        watch=EvalWatch(cfg.health),
    )
    run_id = resume(run) if t.resume else None
    if is_main:
        log.info(meter.describe())
    run.tracker = start_tracker(
        cfg.tracking,
        run_id=run_id,
        run_name=cfg.experiment,
        config=redact(cfg.to_dict(), secrets=secrets),
        output_dir=output_dir,
        is_main_process=is_main,
    )
    return run


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> Any:
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


def find_checkpoint(run: Run) -> Path | None:
    """The checkpoint every rank resumes from: the main process picks (and downloads) it, the others follow.

    Another machine's first process downloads the same checkpoint into its own OUTPUT_DIR when the main
    process's copy is not on its disk.
    """
    acc = run.accelerator
    chosen: list[Any] = [None, None]
    if acc.is_main_process:
        found = run.store.fetch_latest()
        chosen = [str(found) if found else None, manifest_step(found) if found else None]
    if acc.num_processes == 1:
        return Path(chosen[0]) if chosen[0] else None
    broadcast_object_list(chosen)
    path, step = chosen
    if path is None:
        return None
    here = Path(path)
    missing = not acc.is_main_process and not here.is_dir()
    if missing and acc.is_local_main_process:
        found = run.store.fetch_latest(remote=True)
        if found is None or manifest_step(found) != step:
            raise UserError(f"this machine could not fetch the checkpoint of step {step} the main process resumes")
    acc.wait_for_everyone()
    if missing:
        local = run.store.fetch_latest(remote=False)
        if local is None or manifest_step(local) != step:
            raise UserError(f"this machine has no copy of the checkpoint of step {step} the main process resumes")
        here = local
    return here


def resume(run: Run) -> str | None:
    """Continue from the store's latest checkpoint if there is one; returns the tracker run id to continue."""
    directory = find_checkpoint(run)
    if directory is None:
        log.info("no checkpoint found: starting a fresh run")
        return None
    deepspeed = uses_deepspeed(run.accelerator)
    # (under ZeRO-3 every rank reads the same weights into the gathered projector; rank 0's copy is re-sharded)
    with gathered(run.raw.projector.parameters(), modifier_rank=0):
        train_state, data_state = read_checkpoint(
            directory,
            projector=run.raw.projector,
            optimizer=None if deepspeed else run.optimizer,
            scheduler=run.scheduler,
            config=run.cfg.to_dict(),
            rank=run.accelerator.process_index,
        )
    if deepspeed:
        load_deepspeed_optimizer(run, directory)
    run.stream.load_state_dict(data_state)
    run.step = int(train_state["step"])
    run.metrics = dict(train_state.get("metrics", {}))
    run.best_wer = train_state.get("best_wer")
    run.meter.load_state_dict(train_state.get("billing"))
    run.watch.load_state_dict(train_state.get("health"))
    log.info("resumed from %s at step %d", directory, run.step)
    return train_state.get("tracker_run_id")


def train_loop(run: Run) -> int:
    """Train until max_steps or a stop signal; returns the process exit code."""
    cfg, acc, model, raw = run.cfg, run.accelerator, run.model, run.raw
    t = cfg.training
    device = acc.device
    params = [p for p in raw.parameters() if p.requires_grad]
    run.stop.install()
    model.train()
    loss_sum = torch.zeros((), device=device)  # summed over the logging window, on device: no sync per step
    token_count = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    # Throughput and ETA count training time only: evaluation and checkpoint time are left out.
    samples, steps, data_wait, train_time = 0, 0, 0.0, 0.0
    grad_norm = torch.zeros((), device=device)

    if t.eval_at_start and run.step == 0 and run.eval_set:
        run_eval(run)  # the baseline the curves start from (a resumed run has it already)
    # A restarted container past its budget ends at once, as done (a fresh run trains to its first logged step,
    # so there is a checkpoint to resume when the budget is raised).
    ending = end_early(run, run.meter.reached()) if run.step > 0 else None
    if ending:
        log.info("%s: not training; the checkpoint of step %d stands", ending, run.step)
        return 0
    stopping = False
    while run.step < t.max_steps and not stopping and not ending:
        # -- data: every micro-batch of the step, so the loss can be normalised by the step's label tokens
        t0 = time.perf_counter()
        micro_batches = [next(run.stream) for _ in range(run.grad_accum)]
        data_wait += time.perf_counter() - t0
        try:
            loss, tokens, aux = forward_backward(model, raw, acc, micro_batches)
        except torch.OutOfMemoryError:  # one line saying what to lower; the last checkpoint stays the newest
            last = run.store.last_saved()
            raise OutOfGpuMemory.at_step(
                step=run.step + 1,
                micro_batch=t.batch_size,
                global_batch=t.global_batch_size,
                processes=acc.num_processes,
                last_checkpoint=last.name if last else None,
                device=device,
            ) from None
        loss_sum += loss
        token_count += tokens
        aux_sum += aux
        samples += sum(len(b) for b in micro_batches)

        # -- step (a non-finite loss or gradient skips the update; several in a row stop the run)
        # (under DeepSpeed the engine clipped inside its step and this returns its norm, a float)
        grad_norm = torch.as_tensor(acc.clip_grad_norm_(params, t.max_grad_norm), device=device)
        if torch.isfinite(grad_norm).item():  # CPU-GPU sync point, once per step: needed to decide the skip
            run.optimizer.step()
            run.scheduler.step()
            run.bad_steps = 0
        else:
            run.bad_steps += 1
            run.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient norm, update skipped", run.step + 1)
            if run.bad_steps >= t.max_bad_steps:
                raise TrainingDiverged(
                    f"{run.bad_steps} non-finite steps in a row at step {run.step + 1}; the last good checkpoint "
                    f"is kept: lower training.learning_rate or training.max_grad_norm and restart"
                )
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        steps += 1
        train_time += time.perf_counter() - t0

        # -- log
        if run.step % t.logging_steps == 0 or run.step == t.max_steps:
            window_tokens = acc.reduce(token_count, reduction="sum").clamp(min=1)
            metrics = {
                "train/loss": float(acc.reduce(loss_sum, reduction="sum") / window_tokens),
                "train/grad_norm": float(grad_norm),
                "train/lr": run.scheduler.get_last_lr()[0],
                "train/samples_per_s": samples * acc.num_processes / train_time,
                "train/data_wait_s": data_wait / steps,
                "train/skipped_steps": run.skipped_steps,
            }
            if float(aux_sum):
                metrics["train/aux_loss"] = float(aux_sum) / steps
            metrics |= projector_metrics(raw) | stream_metrics(run.stream) | run.meter.metrics()
            run.watch.note_train_loss(metrics["train/loss"])
            if acc.is_main_process:
                eta = (t.max_steps - run.step) * train_time / steps
                money = (run.meter.usd(), run.meter.projected_usd(eta))
                log.info(format_step(run.step, t.max_steps, metrics, seconds_per_step=train_time / steps, usd=money))
                append_metrics(run.output_dir, run.step, metrics)
            run.tracker.log(metrics, step=run.step)
            loss_sum.zero_(), token_count.zero_(), aux_sum.zero_()
            samples, steps, data_wait, train_time = 0, 0, 0.0, 0.0
            ending = end_early(run, run.meter.reached())

        # -- evaluate and checkpoint
        if run.eval_set and (run.step % t.eval_steps == 0 or run.step == t.max_steps):
            warning = run.watch.observe(run.step, run_eval(run).loss)
            if warning and acc.is_main_process:
                log.warning(warning)
                run.tracker.alert("tiny-audio: consider cancelling this run", warning)
            stop_here = warning is not None and cfg.health.stop_on_warning
            ending = ending or end_early(run, "health warning (health.stop_on_warning)" if stop_here else None)
        # (a periodic save is left out while updates are being skipped: the last good checkpoint stays the newest)
        periodic = run.step % t.save_steps == 0 and run.bad_steps == 0
        stopping = stop_agreed(run)
        if ending and run.step < t.max_steps:
            log.info("%s: saving, uploading and ending the run at step %d as done", ending, run.step)
        if periodic or run.step == t.max_steps or stopping or ending:
            save(run, final=run.step >= t.max_steps)

    return EXIT_STOPPED if stopping and run.step < t.max_steps else 0


def end_early(run: Run, reason: str | None) -> str | None:
    """The main process's reason to end the run as done before max_steps (a budget reached; a health warning
    when health.stop_on_warning), the same on every rank: the main process's clock decides, and every rank
    stops after the same step, or the ones that went on would wait forever for the others."""
    if run.accelerator.num_processes == 1:
        return reason
    box = [reason]
    broadcast_object_list(box)
    return box[0]


def stop_agreed(run: Run) -> bool:
    """Whether any rank got a stop signal: every rank stops (and saves) after the SAME step, or the ones that
    went on would wait forever for the others in the next collective."""
    if run.accelerator.num_processes == 1:
        return run.stop.requested
    flag = torch.tensor(float(run.stop.requested), device=run.accelerator.device)
    return bool(run.accelerator.reduce(flag, reduction="sum").item() > 0)


def load_deepspeed_optimizer(run: Run, directory: Path) -> None:
    """ZeRO partitions the optimizer state: every rank takes its own part, which needs the same process count."""
    from tiny_audio.checkpoint import _load_torch

    saved = _load_torch(directory / "optimizer.pt")
    parts = saved.get("deepspeed_ranks") if isinstance(saved, dict) else None
    if parts is None:
        raise UserError(
            f"{directory} was not saved under DeepSpeed; its optimizer state cannot be loaded into a ZeRO run "
            "(resume it without training.deepspeed, or set training.resume=false to start fresh)"
        )
    if len(parts) != run.accelerator.num_processes:
        raise UserError(
            f"{directory} was saved by {len(parts)} DeepSpeed processes, this run has "
            f"{run.accelerator.num_processes}: ZeRO optimizer state resumes with the same process count"
        )
    zero = run.optimizer.optimizer
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


def forward_backward(
    model: torch.nn.Module, raw: ASRModel, acc: Accelerator, micro_batches: list
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward + backward over one optimizer step's micro-batches; returns (summed loss, label tokens, aux loss).

    The gradient is that of (summed token loss over the WHOLE step) / (label tokens in the whole step, over every
    micro-batch and rank): averaging per micro-batch instead would weight a short transcript's tokens more than
    a long one's and make the result depend on how the batch was split.
    """
    device = acc.device
    step_tokens = sum(raw.prompt.count_label_tokens(text) for b in micro_batches for text in b.texts)
    global_tokens = acc.reduce(torch.tensor(float(step_tokens), device=device), reduction="sum")
    # DDP averages gradients over ranks, so each rank scales its summed loss by world size / global tokens.
    scale = acc.num_processes / global_tokens.clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    deepspeed = uses_deepspeed(acc)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = nullcontext() if last or deepspeed else acc.no_sync(model)
        with sync, acc.autocast():
            out = model(batch.audio.to(device, non_blocking=True), batch.audio_lengths.to(device), batch.texts)
            step_loss = out.loss_sum * scale + out.aux_loss / len(micro_batches)
            if deepspeed:
                # the engine reduces gradients at the boundary and steps (clipping included) there; the loss is
                # already normalised over the whole step, so it must not divide by the accumulation count again
                model.set_gradient_accumulation_boundary(last)
                model.backward(step_loss, scale_wrt_gas=False)
                if last:
                    model.step()
            else:
                acc.backward(step_loss)
        loss_sum += out.loss_sum.detach()
        aux_sum += out.aux_loss.detach() / len(micro_batches)
    return loss_sum, torch.tensor(float(step_tokens), device=device), aux_sum


def append_metrics(output_dir: Path, step: int, metrics: dict[str, float]) -> None:
    """One JSON line per logged step and per evaluation in OUTPUT_DIR/metrics.jsonl (training lines hold
    `train/*`, evaluation lines `eval/*`): the full-precision record, tracker or not."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.jsonl"
    with naming_the_file(path), path.open("a") as f:  # a full disk's error names the file
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def format_step(
    step: int,
    max_steps: int,
    m: dict[str, float],
    *,
    seconds_per_step: float,
    usd: tuple[float | None, float | None] = (None, None),
) -> str:
    """`Step 25/20000 | Loss: 8.34 | Grad Norm: 45.2 | LR: 1e-04 | ETA: 14hr | $6.20 of ~$11.40 | 12.3 samples/s`:
    the course's line, with the dollars spent so far and those projected at the end when the price is known."""
    eta = (max_steps - step) * seconds_per_step
    spent, projected = usd
    money = f"{format_usd(spent)} of ~{format_usd(projected)} | " if spent is not None and projected is not None else ""
    return (
        f"Step {step}/{max_steps} | Loss: {m['train/loss']:.2f} | Grad Norm: {m['train/grad_norm']:.1f} | "
        f"LR: {m['train/lr']:.0e} | ETA: {format_duration(eta)} | {money}{m['train/samples_per_s']:.1f} samples/s"
    )


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}hr"
    if seconds >= 60:
        return f"{seconds / 60:.0f}min"
    return f"{seconds:.0f}s"


def projector_metrics(model: ASRModel) -> dict[str, float]:
    metrics = getattr(model.projector, "metrics", None)
    return metrics() if callable(metrics) else {}


def stream_metrics(stream: Any) -> dict[str, float]:
    return {f"data/{k}": float(v) for k, v in stream.stats().items() if isinstance(v, int | float)}


def run_eval(run: Run) -> EvalResult:
    result = evaluate(
        run.raw,
        run.eval_set,
        device=run.accelerator.device,
        max_new_tokens=run.cfg.data.max_new_tokens,
        autocast=run.accelerator.autocast,
    )
    run.metrics = result.metrics()
    if result.wer is not None and not math.isnan(result.wer):
        run.best_wer = result.wer if run.best_wer is None else min(run.best_wer, result.wer)
        run.metrics["eval/best_wer"] = run.best_wer
    data = data_summary(run)  # a collective: every rank takes part
    if run.accelerator.is_main_process:
        wer = f" | WER: {result.wer:.1%}" if result.wer is not None else ""
        log.info("Eval step %d | Loss: %.3f%s | %s", run.step, result.loss, wer, data)
        append_metrics(run.output_dir, run.step, run.metrics)
        for ref, hyp in result.examples[:2]:
            log.info("  ref: %s\n  hyp: %s", ref, hyp)
    run.tracker.log(run.metrics, step=run.step)
    run.tracker.log_table(
        "eval/examples", ["reference", "hypothesis"], [list(e) for e in result.examples], step=run.step
    )
    return result


def data_summary(run: Run) -> str:
    """`data: 31,872 samples kept, 12 dropped (too_long 8, silence 4) since start`, summed over every rank."""
    stats = run.stream.stats()
    reasons = [reason.value for reason in DropReason]
    counts = [stats.get("samples", 0), *(stats.get(f"dropped/{r}", 0) for r in reasons)]
    if run.accelerator.num_processes > 1:
        total = torch.tensor(counts, dtype=torch.float64, device=run.accelerator.device)
        counts = [int(v) for v in run.accelerator.reduce(total, reduction="sum").tolist()]
    kept, drops = int(counts[0]), {r: int(n) for r, n in zip(reasons, counts[1:], strict=True) if n}
    detail = f" ({', '.join(f'{r} {n:,}' for r, n in drops.items())})" if drops else ""
    return f"data: {kept:,} samples kept, {sum(drops.values()):,} dropped{detail} since start"


def save(run: Run, *, final: bool) -> None:
    """Write a checkpoint locally (atomically) and hand it to the store's background upload.

    Every rank takes part: its RNG states and data position (and under DeepSpeed its optimizer partition) are
    gathered to the main process, which writes the one checkpoint. Under ZeRO-3 the projector's weights are
    gathered from every rank's slice first (the files are written inside that block).
    """
    with gathered(run.raw.projector.parameters()):
        _save(run, final=final)


def _save(run: Run, *, final: bool) -> None:
    acc = run.accelerator
    mine = RankState(rng=capture_rng(), data=run.stream.state_dict())
    ranks = gather_object([mine]) if acc.num_processes > 1 else [mine]
    optimizer_state: dict[str, Any] | None = None
    if uses_deepspeed(acc):
        part = plain_state(run.optimizer.optimizer.state_dict())
        optimizer_state = {"deepspeed_ranks": gather_object([part]) if acc.num_processes > 1 else [part]}
    if not acc.is_main_process:
        return
    config = redact(run.cfg.to_dict(), secrets=run.secrets)
    train_state = {
        "step": run.step,
        "tracker_run_id": run.tracker.run_id,
        "metrics": run.metrics,
        "best_wer": run.best_wer,
        "final": final,
        "experiment": run.cfg.experiment,
        "billing": run.meter.state_dict(),
        "health": run.watch.state_dict(),
    }

    def write(directory: Path) -> None:
        write_checkpoint(
            directory,
            projector=run.raw.projector,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            train_state=train_state,
            data_state=ranks[0].data,
            config=config,
            ranks=ranks,
            optimizer_state=optimizer_state,
        )

    def model_files(directory: Path) -> None:
        export_model(directory, model=run.raw, config=config, step=run.step, metrics=run.metrics)

    path = run.store.save(step=run.step, write=write, model_files=model_files, final=final)
    log.info("checkpoint step %d saved to %s", run.step, path)


def cleanup(run: Run) -> None:
    # The stop handler stays installed while uploads are flushed: a (second) signal during a slow flush exits.
    try:
        run.stream.close()
        if run.accelerator.is_main_process:
            flushed = run.store.flush(timeout=run.cfg.hub.flush_timeout_s)
            if not flushed:
                log.warning(
                    "uploads still pending after %.0fs; the local checkpoint is complete",
                    run.cfg.hub.flush_timeout_s,
                )
        run.store.close()
        run.tracker.finish()
    finally:
        try:  # even after a failure above: a process group left to DDP's reducer can hang the exit
            release_ddp(run)
            run.accelerator.end_training()
        finally:
            run.stop.uninstall()


def release_ddp(run: Run) -> None:
    """Free the DDP wrapper while the process group still exists, before end_training destroys the group.

    DDP's C++ reducer holds the process group. Freed last (when `run` goes out of scope, after
    destroy_process_group), the reducer is the group's last owner and destroys it while holding the GIL; a gloo
    worker thread still releasing a finished collective's tensors then waits for that GIL forever, and a run
    that has saved everything never exits (seen once in CI, rank 0 stuck in ~ProcessGroupGloo). Freed here,
    the reducer only drops a reference, and destroy_process_group, which releases the GIL, ends the group.
    """
    if not isinstance(run.model, torch.nn.parallel.DistributedDataParallel):
        return
    run.accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
    run.model = run.raw
    gc.collect()  # the wrapper sits in reference cycles


def train(cfg: Config, *, output_dir: Path, token: str | None, target: str | None) -> int:
    run = setup(cfg, output_dir=output_dir, token=token, target=target)
    with disk_full_is_one_line(output_dir, last_saved=run.store.last_saved):  # checkpoints, metrics, W&B files
        try:
            return train_loop(run)
        finally:
            cleanup(run)
