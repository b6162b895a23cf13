"""The training loop on the shipped `tiny` experiment: token-normalised accumulation, the entrypoint end to end,
non-finite steps skipped and counted, a diverging run stopped with a clear message."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from tests.runs import QUICK
from tiny_audio.checkpoint import PROJECTOR_FILE, RESUME_DIR, read_checkpoint
from tiny_audio.config import Config
from tiny_audio.data import build_train_stream
from tiny_audio.data.batching import Batch
from tiny_audio.distributed import check_world_size, gradient_accumulation, make_accelerator
from tiny_audio.experiments import load_config
from tiny_audio.export import load_trained
from tiny_audio.model.asr import ASRModel
from tiny_audio.model.loading import build_model
from tiny_audio.step import forward_backward
from tiny_audio.train import TrainingDiverged, cleanup, setup, train_loop

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(*overrides: str) -> Config:
    return load_config("tiny", [*QUICK, *overrides])


def run_entrypoint(output_dir: Path, *overrides: str, env: dict[str, str] | None = None, timeout: float = 300):
    environment = {**os.environ, "EXP": "tiny", "OUTPUT_DIR": str(output_dir), "PYTHONUNBUFFERED": "1"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "entrypoint.py"), "train", *QUICK, *overrides],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def read_metrics(output_dir: Path, kind: str = "train/loss") -> list[dict[str, Any]]:
    """The training lines of metrics.jsonl (kind="eval/loss": its evaluation lines)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind in r]


# --- gradient accumulation ---------------------------------------------------------------------------------


def projector_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.projector.parameters()])


def rows(batch: Any, start: int, stop: int) -> Any:
    return replace(
        batch,
        audio=batch.audio[start:stop],
        audio_lengths=batch.audio_lengths[start:stop],
        texts=batch.texts[start:stop],
        keys=batch.keys[start:stop],
    )


def tiny_step_setup() -> tuple[Accelerator, ASRModel, Batch]:
    """(accelerator, model, first batch of 4 from the real stream, whose planner counted the label tokens)."""
    cfg = tiny_config()
    acc = make_accelerator(cfg)
    model = build_model(cfg, device=acc.device)
    stream = build_train_stream(data=cfg.data, batch_size=4, seed=0, count_tokens=model.prompt.count_label_tokens)
    try:
        return acc, model, next(stream)
    finally:
        stream.close()


def test_two_micro_batches_give_the_gradient_of_one_double_batch() -> None:
    acc, model, batch = tiny_step_setup()
    # shortest transcripts first, so the two halves hold different numbers of label tokens: averaging per
    # micro-batch would then weight them differently
    tokens = [model.prompt.count_label_tokens(t) for t in batch.texts]
    order = sorted(range(4), key=lambda i: tokens[i])
    batch = replace(
        batch,
        audio=batch.audio[order],
        audio_lengths=batch.audio_lengths[order],
        texts=[batch.texts[i] for i in order],
        keys=[batch.keys[i] for i in order],
    )
    tokens = [tokens[i] for i in order]
    assert sum(tokens[:2]) != sum(tokens[2:]), tokens

    model.zero_grad(set_to_none=True)
    loss_one, tokens_one, _ = forward_backward(model, model, acc, [batch])
    one = projector_grad(model)
    model.zero_grad(set_to_none=True)
    loss_two, tokens_two, _ = forward_backward(model, model, acc, [rows(batch, 0, 2), rows(batch, 2, 4)])
    two = projector_grad(model)

    assert float(tokens_one) == float(tokens_two) == sum(tokens)
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-7)

    # what averaging per micro-batch would have given instead: measurably another gradient
    model.zero_grad(set_to_none=True)
    for part in (rows(batch, 0, 2), rows(batch, 2, 4)):
        out = model(part.audio, part.audio_lengths, part.texts)
        n = sum(model.prompt.count_label_tokens(t) for t in part.texts)
        (out.loss_sum / n / 2).backward()
    averaged = projector_grad(model)
    assert (averaged - one).norm() > 1e-3 * one.norm()


def test_a_training_step_does_not_tokenise_what_the_data_planner_already_tokenised() -> None:
    # The planner tokenises every transcript for the label-length filter (in its own thread); the step needs the
    # ids twice more (the step's token count and the labels). Those must come from the prompt builder's cache.
    acc, model, batch = tiny_step_setup()
    tokenizer = model.prompt.tokenizer
    calls: list[str] = []
    real_call = type(tokenizer).__call__

    def counting_call(self, text, *args, **kwargs):
        calls.append(text)
        return real_call(self, text, *args, **kwargs)

    uncached = [tokenizer(t, add_special_tokens=False).input_ids for t in batch.texts]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", counting_call)
        _, tokens, _ = forward_backward(model, model, acc, [batch])
        assert calls == []
        assert model.prompt.count_label_tokens("a transcript the planner never saw") > 1
        assert calls == ["a transcript the planner never saw"]
    assert float(tokens) == sum(len(ids) + 1 for ids in uncached)
    assert [model.prompt.labels(t) for t in batch.texts] == [[*ids, model.prompt.end_of_turn_id] for ids in uncached]


def test_accumulation_keeps_the_global_batch_whatever_the_process_count() -> None:
    cfg = tiny_config("training.batch_size=2", "training.global_batch_size=8")
    assert [gradient_accumulation(cfg, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(Exception, match="global_batch_size=8 is not a multiple"):
        gradient_accumulation(cfg, 3)


def test_more_processes_asked_than_joined_is_an_error() -> None:
    check_world_size(2, {"WORLD_SIZE": "2", "TINY_AUDIO_WORLD_SIZE": "2"})
    check_world_size(1, {})
    with pytest.raises(Exception, match="2 processes were asked for but this run has 1"):
        check_world_size(1, {"TINY_AUDIO_WORLD_SIZE": "2"})


# --- the entrypoint end to end -----------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess: ~15 s of imports and model loading
def test_entrypoint_trains_tiny_and_its_checkpoint_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_entrypoint(out, "training.max_steps=4", "training.save_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Step 4/4 | Loss:" in result.stdout
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics)

    final = out / "checkpoints" / "step-00000004"
    model, cfg = load_trained(final, device=torch.device("cpu"))
    assert cfg.experiment == "tiny" and cfg.training.max_steps == 4
    saved = load_file(str(final / RESUME_DIR / PROJECTOR_FILE))
    loaded = model.projector.state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    # trained: the weights are no longer the seeded initial ones
    fresh = build_model(cfg, device=torch.device("cpu")).projector.state_dict()
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)
    # the resume state reads back into a fresh projector too, at the step it was saved
    train_state, data_state = read_checkpoint(
        final / RESUME_DIR,
        projector=build_model(cfg, device=torch.device("cpu")).projector,
        optimizer=None,
        scheduler=None,
        config=cfg.to_dict(),
    )
    assert train_state["step"] == 4 and train_state["final"] is True
    assert data_state["batches_done"] >= 0


# --- non-finite steps --------------------------------------------------------------------------------------


class Poisoned:
    """The run's real stream, with NaN audio in the batches of the given optimizer steps (1-based)."""

    def __init__(self, stream: Any, steps: set[int], projector: torch.nn.Module | None = None) -> None:
        self.stream, self.steps, self.projector, self.calls = stream, steps, projector, 0
        self.weights_before: dict[int, dict[str, torch.Tensor]] = {}  # step -> projector weights as it starts

    def __next__(self) -> Any:
        batch = next(self.stream)
        self.calls += 1
        step = self.calls  # one micro-batch per step in these runs
        if self.projector is not None:
            self.weights_before[step] = {k: v.clone() for k, v in self.projector.state_dict().items()}
        if step in self.steps:
            batch = replace(batch, audio=torch.full_like(batch.audio, float("nan")))
        return batch

    def __iter__(self) -> Iterator[Any]:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path: Path) -> None:
    cfg = tiny_config("training.max_steps=4", "training.save_steps=100", "training.resume=false")
    run = setup(cfg, output_dir=tmp_path, token=None, target=None)
    assert run.grad_accum == 1
    poisoned = run.stream = Poisoned(run.stream, steps={2}, projector=run.raw.projector)
    try:
        assert train_loop(run) == 0
    finally:
        cleanup(run)
    assert run.step == 4 and run.skipped_steps == 1
    # the skipped update left the weights alone; the updates around it changed them
    before = poisoned.weights_before
    assert all(torch.equal(before[2][k], before[3][k]) for k in before[2])
    assert any(not torch.equal(before[3][k], before[4][k]) for k in before[3])
    metrics = read_metrics(tmp_path)
    assert [m["train/skipped_steps"] for m in metrics] == [0, 1, 1, 1]
    assert not torch.isfinite(torch.tensor(metrics[1]["train/grad_norm"]))
    assert all(torch.isfinite(p).all() for p in run.raw.projector.parameters())


def test_several_non_finite_steps_in_a_row_stop_the_run_keeping_the_last_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_config(
        "training.max_steps=20", "training.save_steps=2", "training.max_bad_steps=3", "training.resume=false"
    )
    run = setup(cfg, output_dir=tmp_path, token=None, target=None)
    run.stream = Poisoned(run.stream, steps=set(range(3, 21)))
    try:
        with pytest.raises(TrainingDiverged) as caught:
            train_loop(run)
    finally:
        cleanup(run)
    message = str(caught.value)
    assert "3 non-finite steps in a row at step 5" in message
    assert "training.learning_rate" in message and "\n" not in message
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002"]


# --- tracking ----------------------------------------------------------------------------------------------


def test_wandb_is_online_with_a_key_offline_without_and_never_asks(tmp_path: Path) -> None:
    from tiny_audio.config import TrackingConfig
    from tiny_audio.errors import UserError
    from tiny_audio.tracking import NullTracker, resolve_mode, start_tracker

    home = {"HOME": str(tmp_path)}  # no ~/.netrc there
    assert resolve_mode(TrackingConfig(), {**home, "WANDB_API_KEY": "k" * 40}) == "online"
    assert resolve_mode(TrackingConfig(), home) == "offline"
    assert resolve_mode(TrackingConfig(mode="disabled"), {**home, "WANDB_API_KEY": "k" * 40}) == "disabled"
    assert resolve_mode(TrackingConfig(backend="none"), home) == "disabled"
    with pytest.raises(UserError, match=r"tracking\.mode=online needs a W&B key"):
        resolve_mode(TrackingConfig(mode="online"), home)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_mode(TrackingConfig(mode="online"), home) == "online"
    # other processes than the main one never start a run, and keep the id they were given
    tracker = start_tracker(
        TrackingConfig(mode="offline"),
        run_id="abc123",
        run_name="tiny",
        config={},
        output_dir=tmp_path,
        is_main_process=False,
    )
    assert isinstance(tracker, NullTracker) and tracker.run_id == "abc123"


def test_deepspeed_configs_are_filled_from_the_experiment() -> None:
    from tiny_audio.distributed import deepspeed_config
    from tiny_audio.errors import ConfigError

    cfg = tiny_config("training.deepspeed=zero2", "training.batch_size=2", "training.max_grad_norm=0.5")
    ds = deepspeed_config(cfg, world_size=2, grad_accum=3, cuda=False)
    assert ds["zero_optimization"]["stage"] == 2
    batches = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batches == (2, 3, 12)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    on_gpu = deepspeed_config(tiny_config("training.deepspeed=zero1"), world_size=1, grad_accum=1, cuda=True)
    assert on_gpu["bf16"] == {"enabled": True}
    stage3 = deepspeed_config(tiny_config("training.deepspeed=zero3"), world_size=4, grad_accum=2, cuda=True)
    assert stage3["zero_optimization"]["stage"] == 3 and stage3["train_batch_size"] == 8 * 4 * 2
    with pytest.raises(ConfigError, match=r"training\.deepspeed must be one of zero1, zero2, zero3"):
        tiny_config("training.deepspeed=zero9")


def test_eval_at_start_logs_the_untrained_baseline_before_the_first_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with_eval = [o for o in QUICK if o != "data.eval=null"]
    cfg = load_config(
        "tiny",
        [
            *with_eval,
            "training.max_steps=2",
            "training.eval_steps=2",
            "training.eval_at_start=true",
            "training.resume=false",
            "data.eval_samples=4",
            "data.eval_wer_samples=2",
            "data.max_new_tokens=4",
        ],
    )
    run = setup(cfg, output_dir=tmp_path, token=None, target=None)
    try:
        with caplog.at_level(logging.INFO, logger="tiny_audio"):
            assert train_loop(run) == 0
    finally:
        cleanup(run)
    assert re.findall(r"Eval step (\d+) \| Loss: [0-9.]+ \| WER", caplog.text) == ["0", "2"]
    # a RunPod user reads what the stream kept and dropped in the log itself (tiny's speech is all valid)
    kept = re.findall(r"Eval step \d+ .*\| data: ([\d,]+) samples kept, 0 dropped since start", caplog.text)
    assert kept == ["0", str(2 * cfg.training.batch_size)]
    evals = read_metrics(tmp_path, kind="eval/loss")
    assert [(r["step"], sorted(r)) for r in evals] == [
        (s, ["eval/best_wer", "eval/loss", "eval/wer", "step"]) for s in (0, 2)
    ]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
