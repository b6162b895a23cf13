"""Experiment tracking: W&B when wanted, a do-nothing stand-in otherwise (no `if wandb:` in the loop); the step
and eval lines of the log, and OUTPUT_DIR/metrics.jsonl, the full-precision record with or without a tracker.

W&B never prompts: with WANDB_API_KEY it runs online, without it offline (files under OUTPUT_DIR/wandb, sync
later with `wandb sync`), or not at all with tracking.mode=disabled / backend=none. The run id is kept in every
checkpoint so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from tiny_audio.config import TrackingConfig
from tiny_audio.cost import format_usd
from tiny_audio.errors import UserError
from tiny_audio.space import naming_the_file


class Tracker(Protocol):
    run_id: str

    def log(self, metrics: dict[str, Any], *, step: int) -> None: ...
    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], *, step: int) -> None: ...
    def alert(self, title: str, text: str) -> None: ...
    def finish(self) -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], *, step: int) -> None:
        pass

    def alert(self, title: str, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, run: Any) -> None:
        self.run = run
        self.run_id: str = run.id

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], *, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (e-mail or Slack, as the user's W&B settings say): for what someone should act on."""
        import wandb

        self.run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)

    def finish(self) -> None:
        self.run.finish()


def resolve_mode(cfg: TrackingConfig, environ: dict[str, str] | None = None) -> str:
    """online / offline / disabled. `online` without a key would make wandb ask for one on the terminal (and
    hang a container): that is a UserError instead, unless a `wandb login` left the key in ~/.netrc."""
    environ = dict(os.environ) if environ is None else environ
    if cfg.backend == "none":
        return "disabled"
    has_key = bool(environ.get("WANDB_API_KEY"))
    if cfg.mode == "online" and not has_key and not _logged_in(environ):
        raise UserError(
            "tracking.mode=online needs a W&B key: set WANDB_API_KEY, or use tracking.mode=offline (sync later "
            "with `wandb sync`) or tracking.mode=disabled"
        )
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if has_key else "offline"


def _logged_in(environ: dict[str, str]) -> bool:
    """Whether `wandb login` stored a key for api.wandb.ai in the netrc file."""
    import netrc

    path = environ.get("NETRC") or str(Path(environ.get("HOME", str(Path.home()))) / ".netrc")
    try:
        return netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)


def start_tracker(
    cfg: TrackingConfig,
    *,
    run_id: str | None,
    run_name: str,
    config: dict[str, Any],
    output_dir: Path,
    is_main_process: bool,
) -> Tracker:
    """Start (or resume, same `run_id`) a run on the main process; every other process gets a NullTracker."""
    run_id = run_id or new_run_id()
    mode = resolve_mode(cfg)
    if not is_main_process or mode == "disabled":
        return NullTracker(run_id)
    import wandb

    output_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.run_name or run_name,
        id=run_id,
        resume="allow",
        mode=mode,
        dir=str(output_dir),
        config=config,
        settings=wandb.Settings(console="off", silent=True),
    )
    return WandbTracker(run)


# --- what the log and metrics.jsonl show ---------------------------------------------------------------------


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


def append_metrics(output_dir: Path, step: int, metrics: dict[str, float]) -> None:
    """One JSON line per logged step and per evaluation in OUTPUT_DIR/metrics.jsonl (training lines hold
    `train/*`, evaluation lines `eval/*`): the full-precision record, tracker or not."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "metrics.jsonl"
    with naming_the_file(path), path.open("a") as f:  # a full disk's error names the file
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def format_data(kept: int, drops: dict[str, int]) -> str:
    """`data: 31,872 samples kept, 12 dropped (too_long 8, silence 4) since start`."""
    drops = {reason: n for reason, n in drops.items() if n}
    detail = f" ({', '.join(f'{r} {n:,}' for r, n in drops.items())})" if drops else ""
    return f"data: {kept:,} samples kept, {sum(drops.values()):,} dropped{detail} since start"
