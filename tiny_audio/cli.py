"""The command line: `tiny-audio [train|check|eval|transcribe] [section.key=value ...]`.

`train` is the default command, so `docker run -e EXP=mlp image` trains. Settings come from the environment or
a `.env` file in the working directory. A mistake the user can fix ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from dotenv import find_dotenv, load_dotenv

from tiny_audio.errors import UserError

ENVIRONMENT_HELP = """
\b
Settings come from the environment or a .env file in the working directory: EXP (required), HF_TOKEN,
HUB_MODEL_ID, OUTPUT_DIR, WANDB_API_KEY, HF_HOME, ON_FINISH, MAX_HOURS, MAX_COST_USD and more. Every variable,
with its default: the README's table, https://github.com/tiny-audio/tiny-audio#environment-variables
\b
Exit codes: 0 done | 2 a mistake to fix (message says how; a full or read-only volume too) | 3 out of
GPU memory (message says which training.batch_size to set) | 143 stopped by a signal after saving a
checkpoint | 130 a second signal cut the stop short
"""

log = logging.getLogger("tiny_audio")


class DefaultToTrain(click.Group):
    """A group whose command defaults to `train`: `tiny-audio training.max_steps=5` means `tiny-audio train ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        help_asked = any(a in ("--help", "-h") for a in args[:1])
        if not help_asked and (not args or args[0] not in self.commands) and not (args and args[0] == "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserError into one line on stderr and exit code 2; anything else keeps its traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def setup_logging(*, secrets: list[str], is_main: bool = True) -> None:
    from tiny_audio.redact import RedactFilter

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactFilter(secrets=secrets))
    logger = logging.getLogger("tiny_audio")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    # Libraries' warnings (huggingface_hub, datasets, ...) pass the same secret filter, prefixed by their source.
    other = logging.StreamHandler(sys.stderr)
    other.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    other.addFilter(RedactFilter(secrets=secrets))
    logging.root.handlers[:] = [other]
    logging.root.setLevel(logging.WARNING)
    for name in ("huggingface_hub", "transformers", "datasets", "accelerate"):
        library = logging.getLogger(name)  # these bring their own handlers, which would print unfiltered
        library.handlers[:] = []
        library.propagate = True
    import transformers

    transformers.utils.logging.set_verbosity_error()  # load reports of the tower-only load are expected
    transformers.utils.logging.disable_progress_bar()


def default_output_dir(experiment: str) -> Path:
    name = Path(experiment).stem
    root = Path("/workspace/outputs") if Path("/workspace").is_dir() else Path("outputs")
    return root / name


def resolve_target(cfg_target: str | None) -> str | None:
    return os.environ.get("HUB_MODEL_ID") or cfg_target


def load_experiment(experiment: str | None, overrides: tuple[str, ...]):  # -> Config
    from tiny_audio.experiments import available_experiments, load_config

    if not experiment:
        raise UserError(
            f"no experiment given: set EXP (e.g. EXP=mlp) or pass --experiment; "
            f"available: {', '.join(available_experiments())}"
        )
    cfg = load_config(experiment, overrides)
    if os.environ.get("WANDB_PROJECT"):
        cfg.tracking.project = os.environ["WANDB_PROJECT"]
    if os.environ.get("WANDB_ENTITY"):
        cfg.tracking.entity = os.environ["WANDB_ENTITY"]
    return cfg


experiment_option = click.option("--experiment", "-e", envvar="EXP", help="Experiment name or YAML path [env: EXP].")
output_option = click.option(
    "--output-dir", envvar="OUTPUT_DIR", type=click.Path(path_type=Path), help="Where the run writes [env: OUTPUT_DIR]."
)
overrides_argument = click.argument("overrides", nargs=-1)


@click.group(cls=DefaultToTrain, epilog=ENVIRONMENT_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tiny-audio")
def app() -> None:
    """Train a speech-recognition projector between a frozen audio encoder and a frozen LLM."""
    load_dotenv(find_dotenv(usecwd=True), override=False)


@app.command(epilog=ENVIRONMENT_HELP)
@experiment_option
@output_option
@overrides_argument
@user_errors
def train(experiment: str | None, output_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Train EXP, resuming from the latest checkpoint when one exists (the default command)."""
    from tiny_audio.hub import require_token

    cfg = load_experiment(experiment, overrides)
    token = os.environ.get("HF_TOKEN") or None
    target = resolve_target(cfg.training.hub_model_id)
    require_token(target, token)  # before any download
    output_dir = output_dir or default_output_dir(cfg.experiment)
    setup_logging(secrets=[token] if token else [], is_main=int(os.environ.get("RANK", "0")) == 0)
    from tiny_audio.train import train as run_training

    sys.exit(run_training(cfg, output_dir=output_dir, token=token, target=target))


@app.command(epilog=ENVIRONMENT_HELP)
@experiment_option
@output_option
@overrides_argument
@user_errors
def check(experiment: str | None, output_dir: Path | None, overrides: tuple[str, ...]) -> None:
    """Validate EXP's config and the environment and print what would run; downloads no weights."""
    from tiny_audio.preflight import preflight

    cfg = load_experiment(experiment, overrides)
    token = os.environ.get("HF_TOKEN") or None
    report = preflight(
        cfg,
        token=token,
        target=resolve_target(cfg.training.hub_model_id),
        output_dir=output_dir or default_output_dir(cfg.experiment),
    )
    click.echo(report.render())
    if report.problems:
        raise UserError(report.problems[0] if len(report.problems) == 1 else "; ".join(report.problems))


@app.command(name="eval")
@click.option("--model", "model_ref", required=True, help="Checkpoint: a local folder or a Hub repo id.")
@click.option("--experiment", "-e", envvar="EXP", help="Take the data source from this experiment's eval section.")
@click.option("--samples", type=int, default=None, help="Samples to score (default: data.eval_samples).")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("eval_results.jsonl"),
    help="Per-sample results (JSON lines).",
)
@overrides_argument
@user_errors
def eval_command(
    model_ref: str, experiment: str | None, samples: int | None, output: Path, overrides: tuple[str, ...]
) -> None:
    """Word error rate of a checkpoint on a data source, with per-sample results."""
    from tiny_audio.inference import evaluate_checkpoint

    setup_logging(secrets=[os.environ.get("HF_TOKEN", "")])
    summary = evaluate_checkpoint(
        model_ref,
        experiment=experiment,
        overrides=overrides,
        samples=samples,
        output=output,
        token=os.environ.get("HF_TOKEN") or None,
    )
    click.echo(json.dumps(summary, indent=2))


@app.command()
@click.option("--model", "model_ref", required=True, help="Checkpoint: a local folder or a Hub repo id.")
@click.argument("audio_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@user_errors
def transcribe(model_ref: str, audio_files: tuple[Path, ...]) -> None:
    """Audio files in, text out (one line per file)."""
    from tiny_audio.inference import transcribe_files

    setup_logging(secrets=[os.environ.get("HF_TOKEN", "")])
    for path, text in transcribe_files(model_ref, list(audio_files), token=os.environ.get("HF_TOKEN") or None):
        click.echo(f"{path}\t{text}")


@app.command(name="compare-padding")
@experiment_option
@click.option("--samples", type=int, default=32, show_default=True, help="Held-out clips to encode both ways.")
@overrides_argument
@user_errors
def compare_padding_command(experiment: str | None, samples: int, overrides: tuple[str, ...]) -> None:
    """Encode EXP's held-out clips as the trainer does (batch padding, masked) and as GLM-ASR's processor does
    (30 s windows, no mask); print the cosine similarity of the encoder's outputs and the time each way took."""
    import torch

    from tiny_audio.diagnostics import compare_padding

    if samples < 1:
        raise UserError(f"--samples must be at least 1 (got {samples})")
    cfg = load_experiment(experiment, overrides)
    token = os.environ.get("HF_TOKEN") or None
    setup_logging(secrets=[token] if token else [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    click.echo(compare_padding(cfg, samples=samples, token=token, device=device).render())


def _plot_command() -> click.Command:
    from tiny_audio.plot import main as plot

    plot.help = "Plot a run's training loss and held-out WER from its log or metrics.jsonl (needs matplotlib)."
    return plot


app.add_command(_plot_command(), name="plot")


def main() -> None:
    app(prog_name="tiny-audio")
