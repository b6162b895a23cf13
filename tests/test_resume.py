"""Never lose a run: the real entrypoint in subprocesses, pushing to the in-memory Hub (tests/hub_server.py)
through the real huggingface_hub client, killed, stopped, faulted, corrupted and resumed.

The child processes find the server through HF_ENDPOINT (read by huggingface_hub at import) and get a short
retry policy through hub.retry_* overrides.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import Commit, HubServer, Repo

from tiny_audio.checkpoint import MANIFEST, PROJECTOR_FILE, RESUME_DIR
from tiny_audio.plot import read_run
from tiny_audio.signals import EXIT_STOPPED

# Every test here starts the trainer (~15 s of imports and model loading each on 2 cores): CI runs them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_" + "Zq7" * 12  # shaped like a real Hub token
REPO = "me/tiny-resume"
BASE = [
    "data.eval=null",
    "data.num_workers=1",
    "training.warmup_steps=2",
    "training.logging_steps=1",
    f"training.hub_model_id={REPO}",
    "hub.min_upload_interval_s=0",
    "hub.retry_initial_s=0.05",
    "hub.retry_max_s=0.2",
    "hub.flush_timeout_s=60",
]


class Trainer:
    """`python entrypoint.py train ...` in a subprocess; its output is read as it comes."""

    def __init__(self, output_dir: Path, endpoint: str | None, *overrides: str, tracking: str = "disabled") -> None:
        env = {**os.environ, "EXP": "tiny", "OUTPUT_DIR": str(output_dir), "PYTHONUNBUFFERED": "1"}
        env.pop("WANDB_MODE", None)  # tracking.mode decides
        env["WANDB_SILENT"] = "true"
        if endpoint is not None:
            env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN)
        self.output_dir = output_dir
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "entrypoint.py"), "train", *BASE, f"tracking.mode={tracking}", *overrides],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,  # nothing may wait for an answer on the terminal
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output[-4000:]}")

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def metrics(self) -> dict[int, float]:
        return dict(read_run(self.output_dir / "metrics.jsonl").train)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def train(output_dir: Path, endpoint: str | None, *overrides: str, tracking: str = "disabled") -> Trainer:
    trainer = Trainer(output_dir, endpoint, *overrides, tracking=tracking)
    trainer.finish()
    return trainer


def resumed_step(trainer: Trainer) -> int | None:
    found = re.search(r"resumed from .* at step (\d+)", trainer.output)
    return int(found.group(1)) if found else None


def stored_step(server: HubServer) -> int | None:
    files = server.repos[REPO].files if REPO in server.repos else {}
    manifest = files.get(f"{RESUME_DIR}/{MANIFEST}")
    return json.loads(manifest)["step"] if manifest else None


def server_with(files: dict[str, bytes]) -> HubServer:
    """A fresh (not yet started) Hub server whose repo holds `files` as one commit."""
    server = HubServer(token=TOKEN)
    oid = hashlib.sha1(repr(sorted(files)).encode() + str(time.time_ns()).encode()).hexdigest()
    server.repos[REPO] = Repo(private=True, commits=[Commit(oid=oid, message="stored", files=dict(files))])
    return server


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, bytes], Trainer]]:
    """One finished 4-step run pushed to the Hub (W&B offline): the repo's files and the run."""
    out = tmp_path_factory.mktemp("stored") / "out"
    with HubServer(token=TOKEN) as server:
        run = train(out, server.endpoint, "training.max_steps=4", "training.save_steps=2", tracking="offline")
        assert run.proc.returncode == 0, run.output[-4000:]
        yield dict(server.repos[REPO].files), run


# --- what a run leaves in the store ------------------------------------------------------------------------


def test_a_run_pushes_its_checkpoint_and_the_token_leaks_nowhere(stored: tuple[dict[str, bytes], Trainer]) -> None:
    files, run = stored
    assert json.loads(files[f"{RESUME_DIR}/{MANIFEST}"])["step"] == 4
    assert {PROJECTOR_FILE, "tiny_audio_config.json", "README.md", "tokenizer.json"} <= set(files)
    assert "Step 4" in files["README.md"].decode()
    # the token: in no log line, no file the run wrote (checkpoints, W&B offline files), no file on the Hub
    assert TOKEN not in run.output
    written = [p for p in run.output_dir.rglob("*") if p.is_file()]
    assert len(written) > 20
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path
    for name, data in files.items():
        assert TOKEN.encode() not in data, name


def test_the_wandb_run_id_is_saved_and_reused(stored: tuple[dict[str, bytes], Trainer], tmp_path: Path) -> None:
    files, first = stored
    run_id = json.loads(files[f"{RESUME_DIR}/train_state.json"])["tracker_run_id"]
    assert run_id and list(first.output_dir.glob(f"wandb/offline-run-*-{run_id}"))
    with server_with(files) as server:
        again = train(tmp_path / "again", server.endpoint, "training.max_steps=6", "training.save_steps=2",
                      tracking="offline")  # fmt: skip
        assert again.proc.returncode == 0, again.output[-4000:]
        assert resumed_step(again) == 4
        assert json.loads(server.repos[REPO].files[f"{RESUME_DIR}/train_state.json"])["tracker_run_id"] == run_id
    assert list((tmp_path / "again").glob(f"wandb/offline-run-*-{run_id}"))


# --- a checkpoint that cannot be resumed -------------------------------------------------------------------


def one_error_line(trainer: Trainer) -> str:
    errors = [line for line in trainer.lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in trainer.output, trainer.output[-4000:]
    return errors[0]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", r"incomplete: .*optimizer\.pt is missing"),
        ("truncated", r"projector\.safetensors is truncated or corrupt"),
    ],
)
def test_a_corrupt_stored_checkpoint_is_a_clear_error(
    stored: tuple[dict[str, bytes], Trainer], tmp_path: Path, damage: str, expected: str
) -> None:
    files = dict(stored[0])
    if damage == "missing":
        del files[f"{RESUME_DIR}/optimizer.pt"]
    else:
        name = f"{RESUME_DIR}/{PROJECTOR_FILE}"
        files[name] = files[name][: len(files[name]) // 2]
    with server_with(files) as server:
        run = train(tmp_path / "out", server.endpoint, "training.max_steps=6")
    assert run.proc.returncode == 2
    line = one_error_line(run)
    assert re.search(expected, line), line
    assert "training.resume=false" in line


def test_an_incompatible_stored_config_says_how_to_start_fresh(
    stored: tuple[dict[str, bytes], Trainer], tmp_path: Path
) -> None:
    with server_with(stored[0]) as server:
        refused = train(tmp_path / "a", server.endpoint, "training.max_steps=6", "projector.hidden_dim=64")
        assert refused.proc.returncode == 2
        line = one_error_line(refused)
        assert "projector.hidden_dim: checkpoint 256, this run 64" in line
        assert "training.resume=false" in line and "hub_model_id" in line
        fresh = train(
            tmp_path / "b",
            server.endpoint,
            "training.max_steps=2",
            "training.save_steps=2",
            "projector.hidden_dim=64",
            "training.resume=false",
        )
        assert fresh.proc.returncode == 0, fresh.output[-4000:]
        assert resumed_step(fresh) is None and sorted(fresh.metrics()) == [1, 2]
        assert stored_step(server) == 2


# --- interruptions -----------------------------------------------------------------------------------------


def test_resume_from_the_hub_and_after_sigkill_continues_the_same_losses(hub: HubServer, tmp_path: Path) -> None:
    steps, every = 16, 3
    common = (f"training.max_steps={steps}", f"training.save_steps={every}")
    reference = train(tmp_path / "reference", None, *common, "training.hub_model_id=null")
    assert reference.proc.returncode == 0, reference.output[-4000:]
    expected = reference.metrics()
    assert sorted(expected) == list(range(1, steps + 1))

    # killed with SIGKILL once a checkpoint past the first has reached the Hub
    first = Trainer(tmp_path / "pod1", hub.endpoint, *common)
    try:
        deadline = time.monotonic() + 120
        while (stored_step(hub) or 0) < 2 * every and time.monotonic() < deadline and first.proc.poll() is None:
            time.sleep(0.01)
        os.kill(first.proc.pid, signal.SIGKILL)
    finally:
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    last_logged = max(int(m) for m in re.findall(r"^Step (\d+)/", first.output, re.MULTILINE))
    assert last_logged < steps, "the run finished before it was killed"
    on_hub = stored_step(hub)
    assert on_hub is not None and on_hub >= 2 * every

    # a fresh pod (empty OUTPUT_DIR) resumes from the Hub at the stored step; losses equal the reference's
    fresh = train(tmp_path / "pod2", hub.endpoint, *common)
    assert fresh.proc.returncode == 0, fresh.output[-4000:]
    assert resumed_step(fresh) == on_hub
    got = fresh.metrics()
    assert sorted(got) == list(range(on_hub + 1, steps + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step

    # the killed pod restarted on its own disk: the last completed checkpoint, at most save_steps lost
    local = [int(p.name.removeprefix("step-")) for p in (tmp_path / "pod1" / "checkpoints").glob("step-*")]
    restarted = train(tmp_path / "pod1", hub.endpoint, *common)
    assert restarted.proc.returncode == 0, restarted.output[-4000:]
    step = resumed_step(restarted)
    assert step is not None and step >= max([*local, on_hub]) and step >= last_logged - every
    for s, loss in restarted.metrics().items():
        assert loss == pytest.approx(expected[s], rel=1e-6, abs=1e-7), s


def test_sigterm_saves_the_current_step_and_exits_143(hub: HubServer, tmp_path: Path) -> None:
    run = Trainer(tmp_path / "out", hub.endpoint, "training.max_steps=500", "training.save_steps=400")
    try:
        run.wait_for(r"^Step 5/500")
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        code = run.finish(timeout=60)
        took = time.monotonic() - sent
    finally:
        run.kill()
    assert code == EXIT_STOPPED, run.output[-4000:]
    assert took < 15, took
    saved = int(run.wait_for(r"checkpoint step (\d+) saved").group(1))
    last_logged = max(int(m) for m in re.findall(r"^Step (\d+)/", run.output, re.MULTILINE))
    assert saved == last_logged >= 5
    assert stored_step(hub) == saved  # flushed to the Hub before exiting
    assert "SIGTERM received" in run.output


def test_a_second_signal_exits_at_once(hub: HubServer, tmp_path: Path) -> None:
    # the graceful stop's upload hangs (a stalled Hub): only the second signal can end the process quickly
    run = Trainer(tmp_path / "out", hub.endpoint, "training.max_steps=500", "training.save_steps=400")
    try:
        run.wait_for(r"^Step 2/500")
        hub.inject(f"POST /api/models/{REPO}/commit", kind="delay", delay_s=60, times=None)
        run.proc.send_signal(signal.SIGTERM)
        run.wait_for(r"checkpoint step \d+ saved")  # the first signal's save, now waiting on the upload
        sent = time.monotonic()
        run.proc.send_signal(signal.SIGINT)
        code = run.finish(timeout=60)
        took = time.monotonic() - sent
    finally:
        hub.clear_faults()
        run.kill()
    assert code == 128 + signal.SIGINT, run.output[-4000:]
    assert took < 5, took
    assert "second SIGINT: exiting now" in run.output


def test_upload_faults_are_retried_and_the_final_state_reaches_the_hub(hub: HubServer, tmp_path: Path) -> None:
    # the repo exists already, so every fault below hits a checkpoint upload, not the start-up
    hub.repos[REPO] = Repo(private=True)
    commit = f"POST /api/models/{REPO}/commit/main"
    faults = [
        hub.inject(commit, status=500, times=2),
        hub.inject(commit, status=429, times=1),
        hub.inject(commit, kind="drop", times=1),
        hub.inject(f"POST /api/models/{REPO}/preupload", status=503, times=1),
    ]
    run = train(tmp_path / "out", hub.endpoint, "training.max_steps=8", "training.save_steps=2")
    assert run.proc.returncode == 0, run.output[-4000:]
    assert all(f.times == 0 for f in faults), [(f.match, f.hits) for f in faults]
    assert "retry" in run.output
    assert sorted(run.metrics()) == list(range(1, 9))  # training never stopped
    assert stored_step(hub) == 8
    assert hub.commits(REPO)[-1].message == "step 8 (final)"
