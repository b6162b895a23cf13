"""The miniature REAL run: the trainer, unchanged, between the pretrained mini encoder and decoder (both frozen),
learns to recognise held-out speech. A broken label mask, a generation prompt that differs from the training
prompt, or a projector that does not train all leave held-out WER far above the threshold (checked by hand)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tiny_audio.assets import ASSETS_DIR
from tiny_audio.config import Config
from tiny_audio.experiments import load_config
from tiny_audio.inference import evaluate_checkpoint, transcribe_files
from tiny_audio.plot import parse_log
from tiny_audio.train import train

# Held-out word error rate the run must reach: measured 5.4% (600 steps); with the trainer broken on purpose the
# same run (then at 5.9%) ended at 76.4% (loss also on prompt and audio positions), 94.8% (generation prompt
# without the chat template) and 97.7% (projector without gradient).
MAX_WER = 0.15
# And it must start from nothing: the untrained model (evaluated at step 0) does not recognise a word (99%).
MIN_FIRST_WER = 0.9
# The LoRA stage's eval loss, against the projector alone's after as many more steps: measured 0.69 (0.146 against
# 0.213 after 300 steps); with the adapters frozen on purpose (no gradient reaches them) 1.00 (0.213 against 0.213).
LORA_LOSS_RATIO = 0.85


class LogLines(logging.Handler):
    """The trainer's log lines, collected while a run trains (a module fixture cannot use caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def train_logged(cfg: Config, output_dir: Path) -> str:
    handler, logger = LogLines(), logging.getLogger("tiny_audio")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert train(cfg, output_dir=output_dir, token=None, target=None) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return "\n".join(handler.lines)


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path, str]:
    """The shipped `mini` run, trained once for this module: (config, output folder, its log)."""
    cfg = load_config("mini", ["tracking.backend=none"])
    output = tmp_path_factory.mktemp("mini") / "run"
    return cfg, output, train_logged(cfg, output)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mini_run_learns_to_recognise_held_out_speech(mini_run: tuple[Config, Path, str], tmp_path: Path) -> None:
    cfg, run, log = mini_run
    curves = parse_log(log)
    print(f"mini: held-out WER % by step {curves.wer}, eval loss {curves.eval_loss[-1]}")
    assert curves.wer, "no evaluation was logged"
    assert curves.wer[0][0] == 0 and curves.wer[0][1] >= 100 * MIN_FIRST_WER, curves.wer
    assert curves.wer[-1][1] <= 100 * MAX_WER, curves.wer
    first_loss, last_loss = curves.train[0][1], curves.train[-1][1]
    assert last_loss < first_loss / 3, curves.train

    # The saved checkpoint, through `eval` and `transcribe`, recognises the held-out set as well.
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    output = tmp_path / "eval.jsonl"
    summary = evaluate_checkpoint(
        str(checkpoint), experiment=None, overrides=(), samples=None, output=output, token=None
    )
    assert summary["samples"] == cfg.data.eval_samples
    assert summary["wer"] <= MAX_WER, summary
    records = [json.loads(line) for line in output.read_text().splitlines()]
    errors, words = sum(r["word_errors"] for r in records), sum(r["reference_words"] for r in records)
    assert summary["wer"] == pytest.approx(errors / words, abs=1e-3)
    clip = tmp_path / "clip.ogg"
    import pyarrow.parquet as pq

    _, shard, row = records[0]["key"].split("/")  # a clip eval scored: eval/<shard>/<row>
    shards = sorted((ASSETS_DIR / "mini" / "data").glob("eval-*.parquet"))
    clip.write_bytes(pq.read_table(shards[int(shard)]).slice(int(row), 1).to_pylist()[0]["audio"]["bytes"])
    [(path, text)] = list(transcribe_files(str(checkpoint), [clip], token=None))
    assert path == clip
    assert text == records[0]["hypothesis"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_lora_stage_learns_more_than_the_projector_alone(mini_run: tuple[Config, Path, str], tmp_path: Path) -> None:
    """The course's second stage, on the miniature: from the trained projector, 200 more steps with LoRA adapters on
    the decoder end at a lower held-out loss and WER than 200 more steps of the projector alone."""
    _, run, _ = mini_run
    stage_one = sorted((run / "checkpoints").glob("step-*"))[-1]
    more = [
        "tracking.backend=none",
        f"training.init_from={stage_one}",
        "training.max_steps=200",
        "training.eval_steps=200",
        "training.save_steps=200",
        "training.eval_at_start=false",
    ]
    results = {}
    for name, extra in (("projector", []), ("lora", ["lora.enabled=true"])):
        curves = parse_log(train_logged(load_config("mini", [*more, *extra]), tmp_path / name))
        results[name] = (curves.eval_loss[-1][1], curves.wer[-1][1])
    print(f"200 more steps from the trained projector (eval loss, WER %): {results}")
    (alone_loss, alone_wer), (lora_loss, lora_wer) = results["projector"], results["lora"]
    assert lora_loss < LORA_LOSS_RATIO * alone_loss, results
    assert lora_wer < alone_wer, results


LOG = """config: {...}
Step 10/300 | Loss: 6.10 | Grad Norm: 3.1 | LR: 3e-04 | ETA: 2min | 40.0 samples/s
Step 20/300 | Loss: 5.20 | Grad Norm: 2.9 | LR: 6e-04 | ETA: 2min | 40.0 samples/s
Eval step 20 | Loss: 5.004 | WER: 100.0%
  ref: the dog
  hyp: a cat
Step 20/300 | Loss: 5.10 | Grad Norm: 2.9 | LR: 6e-04 | ETA: 2min | 40.0 samples/s
Eval step 40 | Loss: 0.250 | WER: 12.5%
"""


def test_plot_run_reads_a_console_log_and_metrics_jsonl(tmp_path: Path) -> None:
    from tiny_audio.plot import main, parse_metrics_jsonl

    curves = parse_log(LOG)
    assert curves.train == [(10, 6.1), (20, 5.1)]  # a step logged twice (resume) keeps the last value
    assert curves.eval_loss == [(20, 5.004), (40, 0.25)]
    assert curves.wer == [(20, 100.0), (40, 12.5)]
    records = [{"step": 10, "train/loss": 6.1}, {"step": 20, "eval/loss": 5.0, "eval/wer": 0.125}]
    curves = parse_metrics_jsonl("\n".join(json.dumps(r) for r in records))
    assert curves.train == [(10, 6.1)] and curves.wer == [(20, 12.5)]

    from click.testing import CliRunner

    (tmp_path / "run.log").write_text(LOG)
    result = CliRunner().invoke(main, [str(tmp_path / "run.log"), "--out", str(tmp_path / "run.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.log").write_text("nothing here\n")
    result = CliRunner().invoke(main, [str(tmp_path / "empty.log")])
    assert result.exit_code != 0 and "no training loss" in result.output
