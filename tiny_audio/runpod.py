"""The container's life around training: what start.sh checks before launching, what happens when training
ends (ON_FINISH), and whether a run has already finished.

ON_FINISH, read by docker/start.sh:
  exit       the container exits with the trainer's exit code (default)
  sleep      the container sleeps after training, so the pod stays up for inspection
  stop       RunPod stops the pod: GPU billing ends, the volume is kept (needs RUNPOD_API_KEY)
  terminate  RunPod deletes the pod and its container disk (needs RUNPOD_API_KEY)

RunPod sets RUNPOD_POD_ID in every pod; the user supplies RUNPOD_API_KEY. RUNPOD_API_URL (default
https://rest.runpod.io/v1, RunPod's REST API) lets tests point the calls at a local server.

A pod whose container exits is restarted by RunPod, so a restarted container must not train again: the trainer
marks the last checkpoint `final: true` in its train state, and `finished_checkpoint` finds it.

Command line (used by docker/start.sh): `python -m tiny_audio.runpod plan [OPTIONS] [OVERRIDES] | finish |
finished CHECKPOINTS_DIR`.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, get_args

import click
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from tiny_audio.errors import UserError

# Models shipped inside the package (tiny, mini) are miniatures made to train on CPU; an experiment using any
# other model refuses a machine without GPU unless ALLOW_CPU=1.
SHIPPED_MODEL_SCHEME = "asset://"

OnFinish = Literal["exit", "sleep", "stop", "terminate"]
DEFAULT_API_URL = "https://rest.runpod.io/v1"
TRAIN_STATE_FILE = "train_state.json"
# = tiny_audio.checkpoint.RESUME_DIR, not imported: that module pulls in torch, and start.sh wants this fast.
RESUME_DIR = "last-checkpoint"
_T = TypeVar("_T")


class RunPodError(UserError):
    """A RunPod API call failed for good (bad key, unknown pod, or still failing after the retries)."""


@dataclass(frozen=True)
class FinishAction:
    """What to do when training ends, validated from the environment."""

    action: OnFinish
    pod_id: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    api_url: str = DEFAULT_API_URL


def finish_action_from_env(env: Mapping[str, str] | None = None) -> FinishAction:
    """Read ON_FINISH, RUNPOD_POD_ID, RUNPOD_API_KEY and RUNPOD_API_URL; raise `UserError` naming what is wrong."""
    env = os.environ if env is None else env
    action = env.get("ON_FINISH", "").strip().lower() or "exit"
    choices = get_args(OnFinish)
    if action not in choices:
        raise UserError(f"ON_FINISH={env.get('ON_FINISH')!r} is not one of {', '.join(choices)}")
    pod_id = env.get("RUNPOD_POD_ID") or None
    api_key = env.get("RUNPOD_API_KEY") or None
    api_url = (env.get("RUNPOD_API_URL") or DEFAULT_API_URL).rstrip("/")
    if action in ("stop", "terminate"):
        if not pod_id:
            raise UserError(f"ON_FINISH={action} needs RUNPOD_POD_ID (RunPod sets it inside a pod)")
        if not api_key:
            raise UserError(f"ON_FINISH={action} needs RUNPOD_API_KEY (a RunPod API key with write access to pods)")
    return FinishAction(action=action, pod_id=pod_id, api_key=api_key, api_url=api_url)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LaunchPlan:
    """What start.sh needs to know before launching training."""

    on_finish: OnFinish
    gpus: int


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
    messages), and the GPUs: with none visible only experiments on shipped miniature models (asset://) train,
    unless ALLOW_CPU=1.
    """
    from tiny_audio.cli import load_experiment  # the CLI's messages for a missing or wrong EXP

    env = os.environ if env is None else env
    action = finish_action_from_env(env)
    cfg = load_experiment(experiment, tuple(overrides))
    gpus = visible_gpus(env)
    miniature = all(m.startswith(SHIPPED_MODEL_SCHEME) for m in (cfg.model.encoder_id, cfg.model.decoder_id))
    if gpus == 0 and not miniature and env.get("ALLOW_CPU") != "1":
        raise UserError(
            f"no GPU visible, and experiment {cfg.experiment} would take days on CPU: on RunPod pick a GPU pod, "
            "with docker run pass --gpus all; ALLOW_CPU=1 trains on CPU anyway"
        )
    return LaunchPlan(on_finish=action.action, gpus=gpus)


def stop_pod(
    *,
    pod_id: str,
    api_key: str,
    api_url: str = DEFAULT_API_URL,
    attempts: int = 5,
    wait_s: float = 2.0,
    timeout_s: float = 30.0,
) -> None:
    """Stop the pod (`POST {api_url}/pods/{pod_id}/stop`): compute billing ends, the volume stays."""
    _call(
        "POST", f"{api_url}/pods/{pod_id}/stop", api_key=api_key, attempts=attempts, wait_s=wait_s, timeout_s=timeout_s
    )


def terminate_pod(
    *,
    pod_id: str,
    api_key: str,
    api_url: str = DEFAULT_API_URL,
    attempts: int = 5,
    wait_s: float = 2.0,
    timeout_s: float = 30.0,
) -> None:
    """Terminate (delete) the pod (`DELETE {api_url}/pods/{pod_id}`)."""
    _call("DELETE", f"{api_url}/pods/{pod_id}", api_key=api_key, attempts=attempts, wait_s=wait_s, timeout_s=timeout_s)


def perform(action: FinishAction, *, attempts: int = 5, wait_s: float = 2.0) -> None:
    """Carry out a stop or terminate action; exit and sleep are the start script's to do, so nothing happens."""
    if action.action not in ("stop", "terminate"):
        return
    assert action.pod_id and action.api_key  # finish_action_from_env guarantees both
    call = stop_pod if action.action == "stop" else terminate_pod
    call(pod_id=action.pod_id, api_key=action.api_key, api_url=action.api_url, attempts=attempts, wait_s=wait_s)


def _is_transient(error: BaseException) -> bool:
    """Rate limits, server errors and dropped connections are worth retrying; other 4xx answers are not."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code == 429 or error.code >= 500
    return isinstance(error, urllib.error.URLError | TimeoutError | ConnectionError)


def _call(method: str, url: str, *, api_key: str, attempts: int, wait_s: float, timeout_s: float) -> None:
    request = urllib.request.Request(
        url, method=method, headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
    )
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=wait_s, max=60),
        retry=retry_if_exception(_is_transient),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt, urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read()
    except urllib.error.HTTPError as error:
        body = error.read(300).decode("utf-8", "replace").strip()
        hint = " (check RUNPOD_API_KEY)" if error.code in (401, 403) else ""
        raise RunPodError(f"RunPod API {method} {url} answered {error.code} {error.reason}{hint}: {body}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise RunPodError(f"RunPod API {method} {url} unreachable after {attempts} attempts: {error}") from None


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
    click.echo(f"{found.on_finish} {found.gpus}")


@cli.command()
def finish() -> None:
    """Stop or terminate this pod as ON_FINISH says (exit and sleep do nothing here)."""
    action = _or_exit(finish_action_from_env)
    if action.action in ("stop", "terminate"):
        click.echo(f"runpod: asking RunPod to {action.action} pod {action.pod_id}", err=True)
    _or_exit(lambda: perform(action))


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
