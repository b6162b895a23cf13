"""`check`: resolve and validate a run's config and environment, print what would run; download no weights.

Where the Hub answers, it also confirms that the models, data sets and checkpoint repo are reachable with the
token; offline, it says which of those checks it could not make.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tiny_audio.assets import SCHEME as ASSET_SCHEME
from tiny_audio.config import Config, SourceConfig
from tiny_audio.errors import UserError
from tiny_audio.runpod import cpu_refused

# Widths of the public models the shipped experiments name, so the plan shows parameter counts offline.
KNOWN_WIDTHS = {
    "zai-org/GLM-ASR-Nano-2512": 1280,
    "Qwen/Qwen3-0.6B": 1024,
    "Qwen/Qwen3-1.7B": 2048,
    "Qwen/Qwen3-4B": 2560,
}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    refused: str | None = None
    """Why training would not start on this machine although the config is valid (no GPU)."""

    def render(self) -> str:
        out = list(self.lines)
        if self.unchecked:
            unique = list(dict.fromkeys(self.unchecked))  # the train and eval splits of one data set: said once
            out.append("not checked (Hub unreachable or offline): " + "; ".join(unique))
        if self.problems:
            out.append(f"result: {len(self.problems)} problem(s)")
        elif self.refused:
            out.append(f"result: the config is ready, but {self.refused}")
        else:
            out.append("result: ready")
        return "\n".join(out)


def preflight(cfg: Config, *, token: str | None, target: str | None, output_dir: Path) -> Report:
    from tiny_audio import hub

    report = Report()
    m, p, t = cfg.model, cfg.projector, cfg.training
    report.lines.append(f"experiment: {cfg.experiment}")
    report.lines.append(f"encoder:    {m.encoder_id} ({m.encoder_type} audio tower only, frozen)")
    report.lines.append(f"decoder:    {m.decoder_id} (frozen)")
    in_dim, out_dim = width_of(m.encoder_id), width_of(m.decoder_id)
    params = f", {projector_parameters(cfg, in_dim, out_dim):,} trainable parameters" if in_dim and out_dim else ""
    report.lines.append(f"projector:  {p.type} (stack {p.stack}, hidden {p.hidden_dim}{params})")
    if cfg.lora.enabled:
        lora = cfg.lora
        report.lines.append(
            f"lora:       rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on "
            f"{', '.join(lora.target_modules)} (trained with the projector)"
        )
    if cfg.training.init_from:
        report.lines.append(f"starts from: {cfg.training.init_from} (its projector, for a fresh run)")
    gpus = torch.cuda.device_count()
    processes = int(os.environ.get("NUM_PROCESSES") or max(gpus, 1))
    report.lines += recipe_lines(cfg, processes=processes, report=report)
    for i, source in enumerate(cfg.data.train):
        report.lines.append(f"data[{i}]:    {describe_source(source)} (weight {source.weight:g})")
    if cfg.data.eval is not None:
        report.lines.append(f"eval:       {describe_source(cfg.data.eval)} ({cfg.data.eval_samples} samples)")
    report.lines.append(f"checkpoints: {target or 'local only'} (+ {output_dir}/checkpoints)")
    report.lines.append(f"device:     {describe_device(cfg, gpus)}")
    if cpu_refused(cfg, gpus=gpus, env=os.environ):
        report.refused = (
            "training would be refused on this machine: no GPU visible (on RunPod pick a GPU pod, with docker run "
            "pass --gpus all; ALLOW_CPU=1 trains on CPU anyway)"
        )
    from tiny_audio.tracking import resolve_mode

    try:
        report.lines.append(f"tracking:   {cfg.tracking.backend} ({resolve_mode(cfg.tracking)})")
    except UserError as exc:
        report.problems.append(str(exc))
    if t.deepspeed:
        report.lines.append(f"deepspeed:  {t.deepspeed}")

    try:
        hub.require_token(target, token)
    except UserError as exc:
        report.problems.append(str(exc))
    for ref, kind in ((m.encoder_id, "model"), (m.decoder_id, "model")):
        check_location(report, ref, kind=kind, token=token)
    for source in [*cfg.data.train, *([cfg.data.eval] if cfg.data.eval else [])]:
        check_source(report, source, token=token)
    if target and hub.is_hub_repo(target):
        check_remote(report, hub.repo_id_of(target), kind="model", token=token, must_exist=False)
    check_writable(report, output_dir)
    check_space(report, cfg, output_dir=output_dir, token=token)
    return report


def recipe_lines(cfg: Config, *, processes: int, report: Report) -> list[str]:
    """The training recipe as it would run with `processes` processes: batch arithmetic, optimizer, schedule."""
    t, d = cfg.training, cfg.data
    per_step = t.batch_size * processes
    global_batch = t.global_batch_size or per_step
    if global_batch % per_step:
        report.problems.append(
            f"training.global_batch_size={global_batch} is not a multiple of training.batch_size x processes = "
            f"{t.batch_size} x {processes}; choose a global batch size divisible by {per_step}"
        )
    accumulation = max(global_batch // per_step, 1)
    precision = t.precision if t.precision != "auto" else "auto (bf16-mixed on a GPU, fp32 on CPU)"
    compiled = {True: "on", False: "off"}.get(t.compile, "auto (on with a GPU)")  # type: ignore[call-overload]
    evaluation = (
        f"eval every {t.eval_steps} steps on {d.eval_samples} held-out samples (WER on {d.eval_wer_samples}, "
        f"up to {d.max_new_tokens} new tokens)"
        if d.eval is not None
        else "no evaluation"
    )
    return [
        f"training:   {t.max_steps} steps, global batch {global_batch} = {t.batch_size}/device x {accumulation} "
        f"accumulation x {processes} process(es)",
        f"optimizer:  AdamW lr {t.learning_rate:.1e} (betas {t.adam_beta1:g}/{t.adam_beta2:g}, weight decay "
        f"{t.weight_decay:g}), {t.warmup_steps} warm-up steps then {t.lr_scheduler}, clip {t.max_grad_norm:g}, "
        f"precision {precision}, torch.compile {compiled}",
        f"schedule:   {evaluation}; checkpoint every {t.save_steps} steps",
    ]


def describe_device(cfg: Config, gpus: int) -> str:
    if gpus:
        return f"{gpus} CUDA GPU(s)"
    if cfg.is_miniature:
        return "CPU (no GPU visible): a miniature experiment, made for the CPU"
    if os.environ.get("ALLOW_CPU") == "1":
        return "CPU (no GPU visible): ALLOW_CPU=1, so it would train on CPU (days for the real models)"
    return "CPU (no GPU visible)"


def width_of(ref: str) -> int | None:
    """Hidden width from a local config.json, or from the table of known public models."""
    from tiny_audio.assets import resolve_asset

    path = Path(resolve_asset(ref)) / "config.json" if ref.startswith(ASSET_SCHEME) else Path(ref) / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config = config.get("audio_config", config)
        return config.get("hidden_size") or config.get("d_model")
    return KNOWN_WIDTHS.get(ref)


def projector_parameters(cfg: Config, in_dim: int, out_dim: int) -> int:
    from tiny_audio.model.projectors import build_projector

    with torch.device("meta"):
        projector = build_projector(cfg.projector, in_dim=in_dim, out_dim=out_dim, target_rms=1.0)
    return sum(p.numel() for p in projector.parameters())


def describe_source(source: SourceConfig) -> str:
    if source.data_files:
        return f"{source.path} files {', '.join(source.data_files)}"
    name = f" ({source.name})" if source.name else ""
    return f"{source.path}{name} split {source.split}"


def check_location(report: Report, ref: str, *, kind: str, token: str | None) -> None:
    if ref.startswith(ASSET_SCHEME):
        from tiny_audio.assets import resolve_asset

        if not Path(resolve_asset(ref)).is_dir():
            report.problems.append(f"{ref} is not shipped in this installation")
        return
    if Path(ref).expanduser().is_dir():
        return
    if ref.startswith(("/", "./", "../", "~")):
        report.problems.append(f"{ref} does not exist")
        return
    check_remote(report, ref, kind=kind, token=token, must_exist=True)


def check_source(report: Report, source: SourceConfig, *, token: str | None) -> None:
    from tiny_audio.assets import resolve_asset

    local = [resolve_asset(f) for f in source.data_files or [] if "://" not in resolve_asset(f)]
    for pattern in local:
        if not glob.glob(pattern):
            report.problems.append(f"data file pattern {pattern} matches no file")
    if source.data_files or Path(source.path).is_dir():
        return
    check_remote(report, source.path, kind="dataset", token=token, must_exist=True)


def check_remote(report: Report, repo_id: str, *, kind: str, token: str | None, must_exist: bool) -> None:
    from tiny_audio import hub

    status = hub.check_access(repo_id, repo_type=kind, token=token)
    if status == "ok":
        report.lines.append(f"  reachable: {kind} {repo_id}")
    elif status == "unreachable":
        report.unchecked.append(f"{kind} {repo_id}")
    elif status == "missing" and not must_exist:
        report.lines.append(f"  {kind} {repo_id} will be created at the first checkpoint")
    elif status == "missing":
        report.problems.append(f"{kind} {repo_id} does not exist on the Hub (check the id)")
    else:
        report.problems.append(f"{kind} {repo_id} is not accessible with this HF_TOKEN (gated or private?)")


def check_writable(report: Report, output_dir: Path) -> None:
    probe = output_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        report.problems.append(f"OUTPUT_DIR {output_dir} is not writable")


def check_space(report: Report, cfg: Config, *, output_dir: Path, token: str | None) -> None:
    """What the run would write on the volume (models not yet cached, checkpoints, W&B) against its free space."""
    from tiny_audio import volume

    plan = volume.plan_space(cfg, output_dir=output_dir, token=token)
    report.lines.append(f"volume:     {plan.describe()}")
    refusal, warning = plan.refusal(), plan.warning()
    if refusal:
        report.problems.append(refusal)
    elif warning:
        report.lines.append(f"warning:    {warning}")
