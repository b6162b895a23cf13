"""The miniature REAL run: the trainer, unchanged, between the pretrained mini encoder and decoder (both frozen),
learns to recognise held-out speech. A broken label mask, a generation prompt that differs from the training
prompt, or a projector that does not train all leave held-out WER far above the threshold (checked by hand)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tiny_audio.experiments import load_config
from tiny_audio.inference import evaluate_checkpoint, transcribe_files
from tiny_audio.plot import parse_log
from tiny_audio.train import train

# Held-out word error rate the run must reach: measured 5.9% (600 steps); with the trainer broken on purpose
# the same run ended at 76.4% (loss also on prompt and audio positions), 94.8% (generation prompt without
# the chat template) and 97.7% (projector without gradient).
MAX_WER = 0.15
# And it must start from nothing: the untrained model (evaluated at step 0) does not recognise a word (98%).
MIN_FIRST_WER = 0.9


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mini_run_learns_to_recognise_held_out_speech(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config("mini", ["tracking.backend=none"])
    with caplog.at_level(logging.INFO, logger="tiny_audio"):
        assert train(cfg, output_dir=tmp_path / "run", token=None, target=None) == 0
    curves = parse_log("\n".join(r.getMessage() for r in caplog.records if r.name == "tiny_audio"))
    assert curves.wer, "no evaluation was logged"
    assert curves.wer[0][0] == 0 and curves.wer[0][1] >= 100 * MIN_FIRST_WER, curves.wer
    assert curves.wer[-1][1] <= 100 * MAX_WER, curves.wer
    first_loss, last_loss = curves.train[0][1], curves.train[-1][1]
    assert last_loss < first_loss / 3, curves.train

    # The saved checkpoint, through `eval` and `transcribe`, recognises the held-out set as well.
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
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

    shard = sorted(Path(cfg.data.eval.data_files[0]).parent.glob("eval-*.parquet"))[0]  # type: ignore[union-attr]
    row = pq.read_table(shard).slice(0, 1).to_pylist()[0]
    clip.write_bytes(row["audio"]["bytes"])
    [(path, text)] = list(transcribe_files(str(checkpoint), [clip], token=None))
    assert path == clip
    assert text == next(r["hypothesis"] for r in records if r["reference"] == row["text"])


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
