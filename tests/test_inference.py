"""`eval` and `transcribe` on a miniature checkpoint: a local folder and a Hub repo (the local test server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from hub_server import HubServer

from tiny_audio.assets import ASSETS_DIR
from tiny_audio.checkpoint import MODEL_CONFIG_FILE, PROJECTOR_FILE
from tiny_audio.cli import app
from tiny_audio.errors import UserError
from tiny_audio.experiments import load_config
from tiny_audio.export import export_model
from tiny_audio.hub import HubRepo, RetryPolicy
from tiny_audio.inference import evaluate_checkpoint, transcribe_files
from tiny_audio.model.loading import build_model

TOKEN = "hf_inference_test_token_0123456789"
# One sample per batch, so a clip is decoded alone in eval exactly as transcribe decodes it.
OVERRIDES = ["training.batch_size=1", "data.eval_samples=4", "data.max_new_tokens=6", "tracking.backend=none"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder as the trainer writes it (export_model), for the tiny experiment, step 7."""
    cfg = load_config("tiny", OVERRIDES)
    model = build_model(cfg, device=torch.device("cpu"))
    with torch.no_grad():  # a projector that is not the freshly initialised one: loading must restore it
        for p in model.projector.parameters():
            p.add_(0.01)
    directory = tmp_path_factory.mktemp("ckpt") / "step-00000007"
    export_model(directory, model=model, config=cfg.to_dict(), step=7, metrics={"eval/wer": 0.5})
    return directory


@pytest.fixture(scope="session")
def evaluated(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict], Path]:
    output = tmp_path_factory.mktemp("eval") / "out" / "results.jsonl"
    summary = evaluate_checkpoint(str(checkpoint), experiment=None, overrides=(), samples=2, output=output, token=None)
    return summary, [json.loads(line) for line in output.read_text().splitlines()], output


@pytest.fixture(scope="session")
def eval_clips(
    evaluated: tuple[dict, list[dict], Path], tmp_path_factory: pytest.TempPathFactory
) -> list[tuple[Path, str]]:
    """The held-out clips `eval` scored (read back by their keys, eval/<shard>/<row>) as .ogg files, with their
    transcripts."""
    shards = sorted((ASSETS_DIR / "tiny" / "data").glob("eval-*.parquet"))
    folder = tmp_path_factory.mktemp("clips")
    out = []
    for i, record in enumerate(evaluated[1]):
        _, shard, row = record["key"].split("/")
        found = pq.read_table(shards[int(shard)]).slice(int(row), 1).to_pylist()[0]
        path = folder / f"clip{i}.ogg"
        path.write_bytes(found["audio"]["bytes"])
        out.append((path, found["text"]))
    return out


def test_eval_writes_one_line_per_sample_and_a_summary(evaluated: tuple[dict, list[dict], Path]) -> None:
    summary, lines, output = evaluated
    assert summary["samples"] == len(lines) == 2
    assert summary["results"] == str(output)
    assert 0.0 <= summary["loss"] < 100 and summary["wer"] is not None
    errors = sum(r["word_errors"] for r in lines)
    words = sum(r["reference_words"] for r in lines)
    assert summary["wer"] == pytest.approx(errors / words, abs=1e-4)
    for record in lines:
        assert record["reference"] and record["normalized_reference"]
        assert record["key"].startswith("eval/")


def test_eval_data_comes_from_overrides_or_an_experiment(checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "results.jsonl"
    # An override changes the checkpoint's own data section; an experiment's eval section replaces it.
    summary = evaluate_checkpoint(
        str(checkpoint), experiment=None, overrides=("data.eval_samples=1",), samples=None, output=output, token=None
    )
    assert summary["samples"] == 1
    summary = evaluate_checkpoint(
        str(checkpoint), experiment="tiny", overrides=OVERRIDES, samples=1, output=output, token=None
    )
    assert summary["samples"] == 1 and "tiny/data/eval" in summary["data"]


def test_transcribe_gives_what_eval_decoded_for_the_same_clip(
    checkpoint: Path, evaluated: tuple[dict, list[dict], Path], eval_clips: list[tuple[Path, str]]
) -> None:
    by_reference = {r["reference"]: r["hypothesis"] for r in evaluated[1]}
    results = list(transcribe_files(str(checkpoint), [p for p, _ in eval_clips], token=None))
    assert [p for p, _ in results] == [p for p, _ in eval_clips]
    assert len(results) == 2
    for (_, text), (_, reference) in zip(results, eval_clips, strict=True):
        assert text == by_reference[reference]


def test_the_projector_weights_are_the_checkpoint_s(checkpoint: Path) -> None:
    from safetensors.torch import load_file

    from tiny_audio.inference import load_checkpoint

    model, cfg = load_checkpoint(str(checkpoint), token=None)
    saved = load_file(str(checkpoint / PROJECTOR_FILE))
    for name, value in model.projector.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert cfg.experiment == "tiny"


def test_user_mistakes_are_one_line_errors(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    with pytest.raises(UserError, match="no such audio file"):
        list(transcribe_files(str(checkpoint), [tmp_path / "missing.wav"], token=None))
    (tmp_path / "noise.wav").write_bytes(b"not audio at all")
    with pytest.raises(UserError, match="not readable as audio"):
        list(transcribe_files(str(checkpoint), [tmp_path / "noise.wav"], token=None))
    with pytest.raises(UserError, match="not a tiny-audio checkpoint"):
        list(transcribe_files(str(tmp_path), [], token=None))
    with pytest.raises(UserError, match="not a checkpoint folder nor a Hub repo"):
        evaluate_checkpoint("./no/such/dir", experiment=None, overrides=(), samples=1, output=out, token=None)
    with pytest.raises(UserError, match="samples"):
        evaluate_checkpoint(str(checkpoint), experiment=None, overrides=(), samples=0, output=out, token=None)


def test_cli_eval_and_transcribe(checkpoint: Path, eval_clips: list[tuple[Path, str]], tmp_path: Path) -> None:
    runner = CliRunner()
    output = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["eval", "--model", str(checkpoint), "--samples", "1", "--output", str(output)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["samples"] == 1 and len(output.read_text().splitlines()) == 1
    result = runner.invoke(app, ["transcribe", "--model", str(checkpoint), str(eval_clips[0][0])])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == [str(eval_clips[0][0])]
    result = runner.invoke(app, ["transcribe", "--model", str(checkpoint), str(tmp_path / "nope.wav")])
    assert result.exit_code == 2 and "no such audio file" in result.output


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # 127.0.0.1 only
    with HubServer(token=TOKEN) as hub_server:
        yield hub_server


def test_transcribe_from_a_hub_repo(
    server: HubServer, checkpoint: Path, eval_clips: list[tuple[Path, str]], tmp_path: Path
) -> None:
    repo = HubRepo("me/mini-asr", token=TOKEN, endpoint=server.endpoint, retry=RetryPolicy(attempts=2))
    repo.ensure_exists(private=True)
    upload = tmp_path / "upload"
    import shutil

    shutil.copytree(checkpoint, upload)
    (upload / "last-checkpoint").mkdir()
    (upload / "last-checkpoint" / "optimizer.pt").write_bytes(b"x" * 1000)  # must not be downloaded
    repo.upload_folder(upload, message="model")
    local = list(transcribe_files(str(checkpoint), [eval_clips[0][0]], token=None))
    hub = list(transcribe_files("me/mini-asr", [eval_clips[0][0]], token=TOKEN, endpoint=server.endpoint))
    assert hub == local
    assert not any("last-checkpoint" in line for line in server.requests if line.startswith("GET"))
    assert (checkpoint / MODEL_CONFIG_FILE).is_file()
    with pytest.raises(UserError, match="no such Hub repo"):
        list(transcribe_files("me/other", [eval_clips[0][0]], token=TOKEN, endpoint=server.endpoint))
