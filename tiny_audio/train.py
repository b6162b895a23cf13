"""The training recipe, read top to bottom: train -> setup -> train_loop -> cleanup.

`train_loop` is the whole loop in one function: data -> forward -> loss -> backward -> step -> log -> eval ->
checkpoint. Everything it needs is built once in `setup` and held by a `Run`. Saving and resuming are the
checkpoint package's (`save_run`, `resume_run`); several processes are tiny_audio.distributed's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from tiny_audio.checkpoint import CheckpointStore, RunParts, resume_run, save_run
from tiny_audio.compile import CompileGuard
from tiny_audio.compile import wanted as compile_wanted
from tiny_audio.config import Config
from tiny_audio.cost import CostMeter, start_meter
from tiny_audio.data import DropReason, EvalSet, build_eval_set, build_train_stream
from tiny_audio.distributed import (
    any_rank,
    check_world_size,
    describe_processes,
    gradient_accumulation,
    main_decides,
    make_accelerator,
    release_ddp,
    sum_over_ranks,
    uses_deepspeed,
)
from tiny_audio.errors import OutOfGpuMemory, UserError
from tiny_audio.evaluate import EvalResult, evaluate
from tiny_audio.export import export_model, init_from_checkpoint
from tiny_audio.health import EvalWatch
from tiny_audio.model.asr import ASRModel
from tiny_audio.model.loading import build_model, parameter_report
from tiny_audio.optim import build_optimizer, build_scheduler
from tiny_audio.precision import Precision
from tiny_audio.redact import redact
from tiny_audio.retry import RetryPolicy
from tiny_audio.signals import EXIT_STOPPED, StopSignal
from tiny_audio.space import disk_full_is_one_line
from tiny_audio.step import forward_backward
from tiny_audio.tracking import Tracker, append_metrics, format_data, format_step, resolve_mode, start_tracker
from tiny_audio.volume import check_volume

log = logging.getLogger("tiny_audio")


class TrainingDiverged(UserError):
    """Too many non-finite losses or gradients in a row."""


@dataclass
class Run:
    cfg: Config
    accelerator: Accelerator
    model: ASRModel  # possibly wrapped (DDP, DeepSpeed); `raw` is the ASRModel itself
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
    compiled: CompileGuard  # torch.compile's parts, and the way back to eager if compiling fails
    step: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # latest eval figures (model card, checkpoint)
    best_wer: float | None = None
    stop: StopSignal = field(default_factory=StopSignal)


def train(cfg: Config, *, output_dir: Path, token: str | None, target: str | None) -> int:
    run = setup(cfg, output_dir=output_dir, token=token, target=target)
    with disk_full_is_one_line(output_dir, last_saved=run.store.last_saved):  # checkpoints, metrics, W&B files
        try:
            return train_loop(run)
        finally:
            cleanup(run)


def setup(cfg: Config, *, output_dir: Path, token: str | None, target: str | None) -> Run:
    t = cfg.training
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
        log.info(describe_processes(cfg, accelerator, grad_accum))

    precision = Precision.resolve(t.precision, device_type=accelerator.device.type)
    model = build_model(cfg, device=accelerator.device, frozen_dtype=precision.frozen_dtype, token=token)
    if is_main:
        for part, trainable, frozen in parameter_report(model):
            log.info("%-9s trainable %12s | frozen %12s", part, f"{trainable:,}", f"{frozen:,}")
        log.info("prompt: %r", model.prompt.render())  # what the decoder reads; <audio> stands for the clip
    trainable = [p for p in model.parameters() if p.requires_grad]  # the projector's only
    optimizer = build_optimizer(cfg, trainable, fused=accelerator.device.type == "cuda")
    scheduler = build_scheduler(cfg, optimizer)
    if compile_wanted(t.compile, device_type=accelerator.device.type):
        model.compile_parts(dynamic=True)  # compiles what forward calls, in place: state-dict keys unchanged
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    compiled = CompileGuard(model.compiled_parts(), reset=lambda: optimizer.zero_grad(set_to_none=True))

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
        tracker=None,  # type: ignore[arg-type]  (started below, with the resumed run's id)
        grad_accum=grad_accum,
        output_dir=output_dir,
        secrets=secrets,
        meter=meter,
        watch=EvalWatch(cfg.health),
        compiled=compiled,
    )
    run_id = resume(run) if t.resume else None
    if run.step == 0 and t.init_from:  # a fresh run of a second stage starts from the first stage's weights
        init_from_checkpoint(model, cfg, token=token)
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


def resume(run: Run) -> str | None:
    """Continue from the store's latest checkpoint if there is one; returns the tracker run id to continue."""
    state = resume_run(checkpoint_parts(run), config=run.cfg.to_dict())
    if state is None:
        return None
    run.step = int(state["step"])
    run.metrics = dict(state.get("metrics", {}))
    run.best_wer = state.get("best_wer")
    run.meter.load_state_dict(state.get("billing"))
    run.watch.load_state_dict(state.get("health"))
    return state.get("tracker_run_id")


def train_loop(run: Run) -> int:
    """Train until max_steps or a stop signal; returns the process exit code."""
    cfg, acc, model, raw = run.cfg, run.accelerator, run.model, run.raw
    t = cfg.training
    device = acc.device
    params = [p for p in raw.parameters() if p.requires_grad]
    deepspeed = uses_deepspeed(acc)
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
    ending = main_decides(acc, run.meter.reached()) if run.step > 0 else None
    if ending:
        log.info("%s: not training; the checkpoint of step %d stands", ending, run.step)
        return 0
    stopping = False
    while run.step < t.max_steps and not stopping and not ending:
        # -- data: every micro-batch of the step, so the loss can be normalised by the step's label tokens
        t0 = time.perf_counter()
        micro_batches = [next(run.stream) for _ in range(run.grad_accum)]
        data_wait += time.perf_counter() - t0

        # -- forward and backward (a failed compile reruns the step eagerly; out of memory is one line)
        try:
            loss, tokens, aux = run.compiled.run(forward_backward, model, raw, acc, micro_batches)
        except torch.OutOfMemoryError:  # the last checkpoint stays the newest
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
        if deepspeed:
            model.step()  # the engine clips, steps (skipping a non-finite update itself) and zeroes the gradients
        grad_norm = torch.as_tensor(acc.clip_grad_norm_(params, t.max_grad_norm), device=device)  # DeepSpeed: its norm
        if torch.isfinite(grad_norm).item():  # CPU-GPU sync point, once per step: needed to decide the skip
            run.optimizer.step()  # (under DeepSpeed the engine has stepped: accelerate's wrapper does nothing)
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
            metrics |= run.compiled.metrics()
            run.watch.note_train_loss(metrics["train/loss"])
            if acc.is_main_process:
                eta = (t.max_steps - run.step) * train_time / steps
                money = (run.meter.usd(), run.meter.projected_usd(eta))
                log.info(format_step(run.step, t.max_steps, metrics, seconds_per_step=train_time / steps, usd=money))
                append_metrics(run.output_dir, run.step, metrics)
            run.tracker.log(metrics, step=run.step)
            loss_sum.zero_(), token_count.zero_(), aux_sum.zero_()
            samples, steps, data_wait, train_time = 0, 0, 0.0, 0.0
            ending = main_decides(acc, run.meter.reached())

        # -- evaluate and checkpoint
        if run.eval_set and (run.step % t.eval_steps == 0 or run.step == t.max_steps):
            warning = run.watch.observe(run.step, run_eval(run).loss)
            if warning and acc.is_main_process:
                log.warning(warning)
                run.tracker.alert("tiny-audio: consider cancelling this run", warning)
            stop_here = warning is not None and cfg.health.stop_on_warning
            ending = ending or main_decides(acc, "health warning (health.stop_on_warning)" if stop_here else None)
        # (a periodic save is left out while updates are being skipped: the last good checkpoint stays the newest)
        periodic = run.step % t.save_steps == 0 and run.bad_steps == 0
        stopping = any_rank(acc, run.stop.requested)  # every rank stops (and saves) after the same step
        if ending and run.step < t.max_steps:
            log.info("%s: saving, uploading and ending the run at step %d as done", ending, run.step)
        if periodic or run.step == t.max_steps or stopping or ending:
            save(run, final=run.step >= t.max_steps)

    return EXIT_STOPPED if stopping and run.step < t.max_steps else 0


def projector_metrics(model: ASRModel) -> dict[str, float]:
    metrics = getattr(model.projector, "metrics", None)
    return metrics() if callable(metrics) else {}


def stream_metrics(stream: Any) -> dict[str, float]:
    return {f"data/{k}": float(v) for k, v in stream.stats().items() if isinstance(v, int | float)}


def run_eval(run: Run) -> EvalResult:
    """Evaluate on the held-out set; the eval line (with the data stream's counts), metrics.jsonl, the tracker."""
    result = evaluate(
        run.raw,
        run.eval_set,
        device=run.accelerator.device,
        max_new_tokens=run.cfg.data.max_new_tokens,
        autocast=run.accelerator.autocast,
    )
    if result.wer is not None and not math.isnan(result.wer):
        run.best_wer = result.wer if run.best_wer is None else min(run.best_wer, result.wer)
    run.metrics = result.metrics(best_wer=run.best_wer)
    data = data_summary(run)  # a collective: every rank takes part
    if run.accelerator.is_main_process:
        log.info(result.line(run.step, data))
        append_metrics(run.output_dir, run.step, run.metrics)
    run.tracker.log(run.metrics, step=run.step)
    run.tracker.log_table(
        "eval/examples", ["reference", "hypothesis"], [list(e) for e in result.examples], step=run.step
    )
    return result


def data_summary(run: Run) -> str:
    """What the training stream kept and dropped since this process started, summed over every rank."""
    stats = run.stream.stats()
    reasons = [reason.value for reason in DropReason]
    kept, *dropped = sum_over_ranks(
        run.accelerator, [stats.get("samples", 0), *(stats.get(f"dropped/{r}", 0) for r in reasons)]
    )
    return format_data(kept, dict(zip(reasons, dropped, strict=True)))


def save(run: Run, *, final: bool) -> None:
    """A checkpoint of this step (every rank takes part), written atomically and handed to the background upload."""
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
    save_run(
        checkpoint_parts(run),
        train_state=train_state,
        config=config,
        model_files=lambda d: export_model(d, model=run.raw, config=config, step=run.step, metrics=run.metrics),
        final=final,
    )


def checkpoint_parts(run: Run) -> RunParts:
    """What a checkpoint of this run saves and restores (the projector, LoRA adapters, optimizer, schedule, data)."""
    return RunParts(
        store=run.store,
        accelerator=run.accelerator,
        projector=run.raw.projector,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        stream=run.stream,
        decoder=run.raw.decoder,
    )


def cleanup(run: Run) -> None:
    # The stop handler stays installed while uploads are flushed: a (second) signal during a slow flush exits.
    try:
        run.stream.close()
        if run.accelerator.is_main_process and not run.store.flush(timeout=run.cfg.hub.flush_timeout_s):
            log.warning(
                "uploads still pending after %.0fs; the local checkpoint is complete", run.cfg.hub.flush_timeout_s
            )
        run.store.close()
        run.tracker.finish()
    finally:
        try:  # even after a failure above: a process group left to DDP's reducer can hang the exit
            release_ddp(run)
            run.accelerator.end_training()
        finally:
            run.stop.uninstall()
