"""Checkpoint contents, validation, local rotation and the file:/// and no-target stores (no network at all)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tiny_audio.checkpoint import (
    CHECKPOINTS_DIR,
    MANIFEST,
    MODEL_CONFIG_FILE,
    PROJECTOR_FILE,
    RESUME_DIR,
    CheckpointStore,
    read_checkpoint,
    write_checkpoint,
)
from tiny_audio.cli import resolve_target
from tiny_audio.config import Config, HubConfig
from tiny_audio.errors import UserError
from tiny_audio.export import model_card, write_model_files

TOKEN = "hf_" + "Tk9" * 12  # shaped like a real Hub token


class Run:
    """A tiny projector + AdamW + LambdaLR after a few real steps: optimizer and scheduler hold real state."""

    def __init__(self, *, hidden: int = 16, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.projector = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 4))
        self.optimizer = torch.optim.AdamW(self.projector.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 / (1 + step))
        self.config = Config().to_dict()
        self.config["projector"]["hidden_dim"] = hidden

    def train(self, steps: int) -> None:
        for _ in range(steps):
            loss = self.projector(torch.randn(2, 8)).pow(2).mean()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()

    def write(self, directory: Path, *, step: int, config: dict[str, Any] | None = None) -> None:
        write_checkpoint(
            directory,
            projector=self.projector,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train_state={"step": step, "tracker_run_id": "run-1", "metrics": {"eval_wer": 0.5}},
            data_state={"epoch": 0, "position": step * 2},
            config=config or self.config,
            export_files=None,
        )

    def model_files(self, directory: Path, *, step: int) -> None:
        card = model_card(config=self.config, step=step, metrics={"eval_wer": 0.5})
        write_model_files(directory, projector=self.projector, config=self.config, card=card)

    def save(self, store: CheckpointStore, *, step: int, final: bool = False) -> Path:
        return store.save(
            step=step,
            write=lambda d: self.write(d, step=step),
            model_files=lambda d: self.model_files(d, step=step),
            final=final,
        )


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def assert_same_state(a: Run, b: Run) -> None:
    for (name, pa), pb in zip(a.projector.state_dict().items(), b.projector.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key in sa["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][key][field], sb["state"][key][field]), (key, field)
    assert a.scheduler.state_dict()["last_epoch"] == b.scheduler.state_dict()["last_epoch"]
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


def test_write_read_restores_weights_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    run = Run()
    run.train(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    run.write(tmp_path / "ckpt", step=3)
    expected = draws()

    fresh = Run(seed=99)  # other weights, empty optimizer, scheduler at step 0
    draws()  # move every generator on
    train_state, data_state = read_checkpoint(
        tmp_path / "ckpt",
        projector=fresh.projector,
        optimizer=fresh.optimizer,
        scheduler=fresh.scheduler,
        config=run.config,
    )
    got = draws()
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert_same_state(run, fresh)
    assert train_state == {"step": 3, "tracker_run_id": "run-1", "metrics": {"eval_wer": 0.5}}
    assert data_state == {"epoch": 0, "position": 6}
    # training on from both gives the same weights: nothing the step depends on was left out
    torch.manual_seed(5)
    run.train(2)
    torch.manual_seed(5)
    fresh.train(2)
    assert_same_state(run, fresh)


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path: Path) -> None:
    run = Run()
    run.train(1)
    run.write(tmp_path, step=1)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    names = {p.name for p in tmp_path.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == names
    assert {"projector.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "rng.json"} <= names
    assert manifest["step"] == 1
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"].values())


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / "optimizer.pt").unlink(), "optimizer.pt"),
        (lambda d: (d / PROJECTOR_FILE).write_bytes((d / PROJECTOR_FILE).read_bytes()[:100]), PROJECTOR_FILE),
        (lambda d: (d / MANIFEST).unlink(), MANIFEST),
        (lambda d: (d / "data_state.json").write_text('{"epoch": 7, "position": 1}\n'), "data_state.json"),
    ],
    ids=["missing-file", "truncated-weights", "no-manifest", "altered-same-size"],
)
def test_corrupt_checkpoint_is_a_user_error_naming_the_file(tmp_path: Path, damage: Any, named: str) -> None:
    run = Run()
    run.train(1)
    run.write(tmp_path, step=1)
    damage(tmp_path)
    fresh = Run(seed=5)
    before = [p.clone() for p in fresh.projector.parameters()]
    with pytest.raises(UserError, match=named):
        read_checkpoint(tmp_path, projector=fresh.projector, optimizer=fresh.optimizer, scheduler=fresh.scheduler)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.projector.parameters(), strict=True))


def test_incompatible_config_says_how_to_start_fresh(tmp_path: Path) -> None:
    run = Run()
    run.write(tmp_path, step=0)
    other = Run(hidden=32)
    with pytest.raises(UserError, match=r"projector\.hidden_dim: checkpoint 16, this run 32.*training\.resume=false"):
        read_checkpoint(
            tmp_path, projector=other.projector, optimizer=other.optimizer, scheduler=None, config=other.config
        )
    # without a config to compare, the weights themselves are checked
    with pytest.raises(UserError, match="does not fit this projector"):
        read_checkpoint(tmp_path, projector=other.projector, optimizer=None, scheduler=None)


def test_no_target_store_rotates_atomically_and_resumes_from_output_dir(tmp_path: Path) -> None:
    run = Run()
    store = CheckpointStore.open(target=None, output_dir=tmp_path, token=None, hub=HubConfig(), keep=2)
    for step in (1, 2, 3):
        run.train(1)
        path = run.save(store, step=step)
        assert path == tmp_path / CHECKPOINTS_DIR / f"step-{step:08d}"
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir()) == ["step-00000002", "step-00000003"]
    assert (path / PROJECTOR_FILE).is_file() and (path / MODEL_CONFIG_FILE).is_file()
    assert "Step 3." in (path / "README.md").read_text()
    # a save killed half-way leaves only a temp dir, which is never taken for the latest
    (tmp_path / CHECKPOINTS_DIR / ".tmp-step-00000004" / RESUME_DIR).mkdir(parents=True)
    store.close()
    assert store.status["uploads_ok"] == 0 and store.status["backend"].startswith("local:")

    reopened = CheckpointStore.open(target=None, output_dir=tmp_path, token=None, hub=HubConfig(), keep=2)
    latest = reopened.fetch_latest()
    assert latest == path / RESUME_DIR
    fresh = Run(seed=7)
    train_state, _ = read_checkpoint(
        latest, projector=fresh.projector, optimizer=fresh.optimizer, scheduler=fresh.scheduler
    )
    assert train_state["step"] == 3
    assert_same_state(run, fresh)
    empty = CheckpointStore.open(target=None, output_dir=tmp_path / "other", token=None, hub=HubConfig(), keep=2)
    assert empty.fetch_latest() is None


def test_file_backend_mirrors_the_repo_layout_and_resumes_elsewhere(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    hub = HubConfig(min_upload_interval_s=0)
    run = Run()
    store = CheckpointStore.open(target=f"file://{volume}", output_dir=tmp_path / "a", token=None, hub=hub, keep=1)
    for step in (1, 2):
        run.train(1)
        run.save(store, step=step)
        assert store.flush(timeout=30)
    store.close()
    assert store.status["uploads_ok"] == 2 and store.status["uploads_failed"] == 0
    assert {PROJECTOR_FILE, MODEL_CONFIG_FILE, "README.md", RESUME_DIR} <= {p.name for p in volume.iterdir()}
    assert not list(volume.glob(".*"))  # no staging or previous copy left behind
    assert json.loads((volume / RESUME_DIR / MANIFEST).read_text())["step"] == 2

    other = CheckpointStore.open(target=f"file://{volume}", output_dir=tmp_path / "b", token=None, hub=hub, keep=1)
    latest = other.fetch_latest()
    assert latest is not None
    fresh = Run(seed=3)
    train_state, _ = read_checkpoint(
        latest, projector=fresh.projector, optimizer=fresh.optimizer, scheduler=fresh.scheduler, config=run.config
    )
    assert train_state["step"] == 2
    assert_same_state(run, fresh)
    other.close()

    # killed between the two renames of a swap: the previous copy is still found
    (volume / RESUME_DIR).rename(volume / ".previous-checkpoint")
    assert (
        CheckpointStore.open(
            target=f"file://{volume}", output_dir=tmp_path / "c", token=None, hub=hub, keep=1
        ).fetch_latest()
        == volume / ".previous-checkpoint"
    )


def test_file_backend_corrupt_store_is_a_user_error(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    run = Run()
    store = CheckpointStore.open(
        target=f"file://{volume}", output_dir=tmp_path / "a", token=None, hub=HubConfig(min_upload_interval_s=0), keep=1
    )
    run.save(store, step=1)
    store.close()
    (volume / RESUME_DIR / "rng.safetensors").unlink()
    other = CheckpointStore.open(
        target=f"file://{volume}", output_dir=tmp_path / "b", token=None, hub=HubConfig(), keep=1
    )
    with pytest.raises(UserError, match=r"rng\.safetensors is missing"):
        other.fetch_latest()


def test_targets_are_parsed_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # HUB_MODEL_ID wins over training.hub_model_id, as the README says (the variable is how a pod is pointed)
    monkeypatch.setenv("HUB_MODEL_ID", "me/run")
    assert resolve_target(None) == "me/run"
    assert resolve_target("you/exp") == "me/run"
    monkeypatch.delenv("HUB_MODEL_ID")
    assert resolve_target("you/exp") == "you/exp"
    assert resolve_target(None) is None
    for bad in ("file://relative/dir", "not a repo"):
        with pytest.raises(UserError, match="checkpoint target"):
            CheckpointStore.open(target=bad, output_dir=tmp_path, token=None, hub=HubConfig(), keep=1)
    with pytest.raises(UserError, match="set HF_TOKEN"):
        CheckpointStore.open(target="me/run", output_dir=tmp_path, token=None, hub=HubConfig(), keep=1)


def test_secrets_never_reach_the_files_written(tmp_path: Path) -> None:
    run = Run()
    config = json.loads(json.dumps(run.config))
    config["model"]["encoder_id"] = f"https://user:{TOKEN}@example.invalid/model"
    config["hf_token"] = "plain-secret-value"
    write_checkpoint(
        tmp_path / RESUME_DIR,
        projector=run.projector,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        train_state={"step": 1, "note": f"token {TOKEN}"},
        data_state={},
        config=config,
    )
    write_model_files(tmp_path, projector=run.projector, config=config, card=f"made with {TOKEN}")
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert TOKEN.encode() not in written and b"plain-secret-value" not in written
    assert b"<redacted>" in written


def test_every_rank_gets_back_its_own_rng_and_data_position(tmp_path: Path) -> None:
    from tiny_audio.checkpoint import RankState, capture_rng

    run = Run()
    ranks = []
    for r in range(2):  # two "processes": different generator states, different data positions
        random.seed(10 + r), np.random.seed(20 + r), torch.manual_seed(30 + r)
        ranks.append(RankState(rng=capture_rng(), data={"position": r}))
    expected = []
    for r in range(2):
        random.seed(10 + r), np.random.seed(20 + r), torch.manual_seed(30 + r)
        expected.append(draws())
    write_checkpoint(
        tmp_path,
        projector=run.projector,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        train_state={"step": 1},
        data_state=ranks[0].data,
        config=run.config,
        ranks=ranks,
    )
    for r in range(2):
        projector = Run().projector
        draws()
        _, data = read_checkpoint(tmp_path, projector=projector, optimizer=None, scheduler=None, rank=r)
        got = draws()
        assert data == {"position": r}
        assert got[:2] == expected[r][:2] and torch.equal(got[2], expected[r][2]), r
    # a rank the saving run did not have keeps its own (seeded) generators and takes the last rank's position
    projector = Run().projector  # (seeds torch itself)
    torch.manual_seed(77)
    state = torch.get_rng_state()
    _, data = read_checkpoint(tmp_path, projector=projector, optimizer=None, scheduler=None, rank=2)
    assert torch.equal(torch.get_rng_state(), state) and data == {"position": 1}


def test_saved_configs_keep_settings_named_like_tokens(tmp_path: Path) -> None:
    run = Run()
    config = dict(run.config)
    config["data"] = {**config["data"], "max_new_tokens": 64, "max_label_tokens": 128}
    config["hub"] = {**config["hub"], "note": f"pushed with {TOKEN}"}
    run.write(tmp_path, step=1, config=config)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data"]["max_new_tokens"] == 64 and saved["data"]["max_label_tokens"] == 128
    assert TOKEN not in json.dumps(saved)
    Config.model_validate({k: v for k, v in saved.items() if k != "hub"})  # loadable again
