"""The container's life around training: what start.sh checks before launching, what happens when training
ends (ON_FINISH), and whether a run has already finished.

ON_FINISH, read by docker/start.sh:
  exit       the container exits with the trainer's exit code
  sleep      the container sleeps after training, so the pod stays up for inspection
  stop       RunPod stops the pod: GPU billing ends, the volume is kept
  terminate  RunPod deletes the pod and its container disk
Unset, it is `stop` where the pod can stop itself (RUNPOD_POD_ID and RUNPOD_API_KEY are set, as RunPod does in
every pod) and `exit` elsewhere: a finished pod left running bills by the hour for nothing. An explicit value wins.

The calls to RunPod's API (REST API v2) are tiny_audio.runpod_api's.

A pod whose container exits is restarted by RunPod, so a restarted container must not train again: the trainer
marks the last checkpoint `final: true` in its train state, and `finished_checkpoint` finds it.

Command line (used by docker/start.sh): `python -m tiny_audio.runpod plan [OPTIONS] [OVERRIDES] | finish |
finished CHECKPOINTS_DIR`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, get_args

import click

from tiny_audio.errors import UserError
from tiny_audio.retry import RetryPolicy
from tiny_audio.runpod_api import API_RETRY, DEFAULT_API_URL, RunPodError, api_url_from_env, pod_action

if TYPE_CHECKING:
    from tiny_audio.config import Config

OnFinish = Literal["exit", "sleep", "stop", "terminate"]
TRAIN_STATE_FILE = "train_state.json"
# = tiny_audio.checkpoint.RESUME_DIR, not imported: that module pulls in torch, and start.sh wants this fast.
RESUME_DIR = "last-checkpoint"
_T = TypeVar("_T")


@dataclass(frozen=True)
class FinishAction:
    """What to do when training ends, validated from the environment."""

    action: OnFinish
    pod_id: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    api_url: str = DEFAULT_API_URL
    explicit: bool = False  # ON_FINISH was set (False: the default for this machine was taken)

    @property
    def on_runpod(self) -> bool:
        return self.pod_id is not None


def finish_action_from_env(env: Mapping[str, str] | None = None) -> FinishAction:
    """Read ON_FINISH, RUNPOD_POD_ID, RUNPOD_API_KEY and RUNPOD_API_URL; raise `UserError` naming what is wrong.

    Without ON_FINISH: `stop` when the pod can stop itself (its id and an API key are set), else `exit`.
    """
    env = os.environ if env is None else env
    pod_id = env.get("RUNPOD_POD_ID") or None
    api_key = env.get("RUNPOD_API_KEY") or None
    api_url = api_url_from_env(env)
    given = env.get("ON_FINISH", "").strip().lower()
    action = given or ("stop" if pod_id and api_key else "exit")
    choices = get_args(OnFinish)
    if action not in choices:
        raise UserError(f"ON_FINISH={env.get('ON_FINISH')!r} is not one of {', '.join(choices)}")
    if action in ("stop", "terminate"):
        if not pod_id:
            raise UserError(f"ON_FINISH={action} needs RUNPOD_POD_ID (RunPod sets it inside a pod)")
        if not api_key:
            raise UserError(f"ON_FINISH={action} needs RUNPOD_API_KEY (a RunPod API key with write access to pods)")
    return FinishAction(
        action=action,  # type: ignore[arg-type]
        pod_id=pod_id,
        api_key=api_key,
        api_url=api_url,
        explicit=bool(given),
    )


def billing_notice(action: FinishAction) -> str | None:
    """The start-up line that says, on RunPod, whether the pod stops billing when training ends."""
    if not action.on_runpod:
        return None
    if action.action in ("stop", "terminate"):
        if action.explicit:
            return None
        return "on RunPod: the pod stops itself when training ends (ON_FINISH=stop; ON_FINISH=sleep keeps it up)"
    if action.explicit:
        why, fix = f"ON_FINISH={action.action}", "set ON_FINISH=stop to stop it then"
    else:
        why, fix = "RUNPOD_API_KEY is not set", "set RUNPOD_API_KEY (a key with write access to pods) to stop it then"
    return f"on RunPod: this pod keeps billing after training ends ({why}); {fix}"


@dataclass(frozen=True)
class LaunchPlan:
    """What start.sh needs to know before launching training."""

    on_finish: OnFinish
    gpus: int
    notice: str | None = None  # one line for the start-up log


def visible_gpus(env: Mapping[str, str] | None = None) -> int:
    """NUM_GPUS when set, else the CUDA devices torch sees (it honours CUDA_VISIBLE_DEVICES; nvidia-smi does not)."""
    env = os.environ if env is None else env
    if env.get("NUM_GPUS"):
        if not env["NUM_GPUS"].isdigit():
            raise UserError(f"NUM_GPUS must be a whole number, got {env['NUM_GPUS']!r}")
        return int(env["NUM_GPUS"])
    import torch  # here, not at the top: `finish` and `finished` stay fast

    return torch.cuda.device_count()


def launch_plan(
    *, experiment: str | None, overrides: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> LaunchPlan:
    """Validate everything a launch depends on, so a mistake ends in one line now and not after hours of training.

    Checks ON_FINISH and the RunPod variables it needs, the experiment and its overrides (with the CLI's own
    messages), the budget (MAX_HOURS, MAX_COST_USD and a price to count against), and the GPUs: with none
    visible only experiments on shipped miniature models (asset://) train, unless ALLOW_CPU=1.
    """
    from tiny_audio.cli import load_experiment  # the CLI's messages for a missing or wrong EXP
    from tiny_audio.cost import check_budget

    env = os.environ if env is None else env
    action = finish_action_from_env(env)
    cfg = load_experiment(experiment, tuple(overrides))
    check_budget(cfg.budget, env)
    gpus = visible_gpus(env)
    if cpu_refused(cfg, gpus=gpus, env=env):
        raise UserError(
            f"no GPU visible, and experiment {cfg.experiment} would take days on CPU: on RunPod pick a GPU pod, "
            "with docker run pass --gpus all; ALLOW_CPU=1 trains on CPU anyway"
        )
    return LaunchPlan(on_finish=action.action, gpus=gpus, notice=billing_notice(action))


def cpu_refused(cfg: Config, *, gpus: int, env: Mapping[str, str]) -> bool:
    """Whether training refuses this machine: no GPU, real models (the shipped miniatures, asset://, are made
    for the CPU), and no ALLOW_CPU=1."""
    return gpus == 0 and not cfg.is_miniature and env.get("ALLOW_CPU") != "1"


def perform(action: FinishAction, *, retry: RetryPolicy = API_RETRY) -> None:
    """Carry out a stop or terminate action; exit and sleep are the start script's to do, so nothing happens."""
    if action.action not in ("stop", "terminate"):
        return
    assert action.pod_id and action.api_key  # finish_action_from_env guarantees both
    pod_action(
        pod_id=action.pod_id,
        action=action.action,  # type: ignore[arg-type]
        api_key=action.api_key,
        api_url=action.api_url,
        retry=retry,
    )


def finished_checkpoint(checkpoints_dir: Path, *, state_file: str = TRAIN_STATE_FILE) -> Path | None:
    """The latest checkpoint under `checkpoints_dir` (OUTPUT_DIR/checkpoints) if its train state says `final: true`.

    A checkpoint is a sub-directory holding `state_file` (JSON with at least `step`), directly or in its
    `last-checkpoint/` (tiny_audio.checkpoint's layout); the latest is the one with the highest step, whatever
    the directories are called. Hidden directories (a checkpoint still being written) are ignored. No
    checkpoint, or a latest one that is not final (an interrupted run, which must resume), gives None.
    """
    latest: tuple[int, Path, bool] | None = None
    for path in sorted(Path(checkpoints_dir).glob(f"*/{state_file}")) + sorted(
        Path(checkpoints_dir).glob(f"*/{RESUME_DIR}/{state_file}")
    ):
        checkpoint = path.parent.parent if path.parent.name == RESUME_DIR else path.parent
        if checkpoint.name.startswith("."):
            continue
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # unreadable: an older checkpoint decides
        step = state.get("step") if isinstance(state, dict) else None
        if not isinstance(step, int):
            continue
        if latest is None or step > latest[0]:
            latest = (step, checkpoint, state.get("final") is True)
    if latest is None or not latest[2]:
        return None
    return latest[1]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Helpers for the container's start script (docker/start.sh)."""
    from dotenv import find_dotenv, load_dotenv

    # As the training CLI does: EXP, ON_FINISH, RUNPOD_API_KEY may come from a .env in the working directory.
    load_dotenv(find_dotenv(usecwd=True), override=False)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--experiment", "-e", envvar="EXP", help="Experiment name or YAML path [env: EXP].")
@click.option("--output-dir", envvar="OUTPUT_DIR", help="Accepted as `train` accepts it; not needed here.")
@click.argument("overrides", nargs=-1)
def plan(experiment: str | None, output_dir: str | None, overrides: tuple[str, ...]) -> None:
    """Validate a launch and print `ON_FINISH GPUS` (exit 2 with one line on stderr when something is wrong).

    Takes the arguments `train` takes.
    """
    found = _or_exit(lambda: launch_plan(experiment=experiment, overrides=overrides))
    if found.gpus == 0:
        click.echo(
            "start: no GPU visible (on RunPod pick a GPU pod; with docker run pass --gpus all): training on CPU",
            err=True,
        )
    if found.notice:
        click.echo(f"start: {found.notice}", err=True)
    click.echo(f"{found.on_finish} {found.gpus}")


@cli.command()
def finish() -> None:
    """Stop or terminate this pod as ON_FINISH says (exit and sleep do nothing here).

    A failure is one line that says why and that the container sleeps instead (start.sh then sleeps: exiting
    would let RunPod restart the container, and the pod would bill on unseen), and exit code 2.
    """
    action = _or_exit(finish_action_from_env)
    if action.action not in ("stop", "terminate"):
        return
    click.echo(f"runpod: asking RunPod to {action.action} pod {action.pod_id}", err=True)
    try:
        perform(action)
    except RunPodError as error:
        click.echo(
            f"error: could not {action.action} pod {action.pod_id}: {error}; sleeping instead of exiting, so "
            f"RunPod does not restart the container: {action.action} the pod in RunPod's console",
            err=True,
        )
        sys.exit(error.exit_code)


@cli.command()
@click.argument("checkpoints_dir", type=click.Path(path_type=Path))
def finished(checkpoints_dir: Path) -> None:
    """Exit 0 and print the checkpoint when the latest checkpoint is final, else exit 1."""
    found = finished_checkpoint(checkpoints_dir)
    if found is None:
        sys.exit(1)
    click.echo(found)


def _or_exit(function: Callable[[], _T]) -> _T:
    try:
        return function()
    except UserError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    cli()
