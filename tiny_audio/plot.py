"""Plot a run's training loss and held-out WER against step, from its console log or OUTPUT_DIR/metrics.jsonl.

    tiny-audio ... 2>&1 | tee run.log
    tiny-audio plot run.log --out run.png [--title "mini run"]

A console log holds the trainer's lines `Step 40/300 | Loss: 2.31 | ...` and `Eval step 100 | Loss: 1.902 |
WER: 35.0%`; a `.jsonl` file holds one JSON record per logged step (`step`, `train/loss`, `eval/loss`,
`eval/wer` as a fraction). Neither needs W&B. Needs matplotlib: `pip install 'tiny-audio[plot]'`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import click

_STEP = re.compile(r"^Step (\d+)/\d+ \| Loss: ([0-9.eE+-]+|nan|inf)")
_EVAL = re.compile(r"^Eval step (\d+) \| Loss: ([0-9.eE+-]+|nan|inf)(?: \| WER: ([0-9.]+)%)?")


@dataclass
class RunCurves:
    train: list[tuple[int, float]] = field(default_factory=list)
    """(step, training loss over the logging window)"""
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    wer: list[tuple[int, float]] = field(default_factory=list)
    """(step, WER in %)"""


def parse_log(text: str) -> RunCurves:
    """The loss and WER points of a console log (other lines are ignored; a resumed run's repeated steps keep
    the last value logged for that step)."""
    train: dict[int, float] = {}
    eval_loss: dict[int, float] = {}
    wer: dict[int, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _STEP.match(line):
            train[int(m[1])] = float(m[2])
        elif m := _EVAL.match(line):
            eval_loss[int(m[1])] = float(m[2])
            if m[3] is not None:
                wer[int(m[1])] = float(m[3])
    return RunCurves(train=sorted(train.items()), eval_loss=sorted(eval_loss.items()), wer=sorted(wer.items()))


def parse_metrics_jsonl(text: str) -> RunCurves:
    """The loss and WER points of metrics.jsonl records (the last record of a step wins)."""
    import json

    train: dict[int, float] = {}
    eval_loss: dict[int, float] = {}
    wer: dict[int, float] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        step = int(record["step"])
        if "train/loss" in record:
            train[step] = float(record["train/loss"])
        if "eval/loss" in record:
            eval_loss[step] = float(record["eval/loss"])
        if "eval/wer" in record:
            wer[step] = 100 * float(record["eval/wer"])
    return RunCurves(train=sorted(train.items()), eval_loss=sorted(eval_loss.items()), wer=sorted(wer.items()))


def read_run(path: Path) -> RunCurves:
    text = path.read_text(errors="replace")
    return parse_metrics_jsonl(text) if path.suffix == ".jsonl" else parse_log(text)


def plot(curves: RunCurves, out: Path, *, title: str) -> None:
    """Loss (left axis, log scale) and WER % (right axis) against step, written as a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise click.ClickException("plotting needs matplotlib: pip install 'tiny-audio[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if curves.train:
        steps, values = zip(*curves.train, strict=True)
        loss_ax.plot(steps, values, color="tab:blue", label="train loss")
    if curves.eval_loss:
        steps, values = zip(*curves.eval_loss, strict=True)
        loss_ax.plot(steps, values, "o--", color="tab:cyan", label="held-out loss")
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (nats per token)")
    loss_ax.grid(True, alpha=0.3)
    wer_ax = loss_ax.twinx()
    if curves.wer:
        steps, values = zip(*curves.wer, strict=True)
        wer_ax.plot(steps, values, "s-", color="tab:red", label="held-out WER")
    wer_ax.set_ylabel("WER (%)")
    wer_ax.set_ylim(0, max(100.0, *(v for _, v in curves.wer)) * 1.05 if curves.wer else 100.0)
    handles = loss_ax.get_legend_handles_labels()[0] + wer_ax.get_legend_handles_labels()[0]
    loss_ax.legend(handles=handles, loc="upper right")
    loss_ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


@click.command(name="plot")
@click.argument("log_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))  # or metrics.jsonl
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("run.png"), show_default=True)
@click.option("--title", default="tiny-audio run", show_default=True)
def main(log_file: Path, out: Path, title: str) -> None:
    """Plot LOG_FILE's training loss and held-out WER against step."""
    curves = read_run(log_file)
    if not curves.train:
        raise click.ClickException(f"{log_file} holds no training loss: is it a tiny-audio log or metrics.jsonl?")
    plot(curves, out, title=title)
    last_wer = f", last WER {curves.wer[-1][1]:.1f}% at step {curves.wer[-1][0]}" if curves.wer else ""
    click.echo(f"{out}: {len(curves.train)} loss points{last_wer}")


if __name__ == "__main__":
    main()
