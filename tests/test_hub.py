"""The Hub checkpoint store through the REAL huggingface_hub client, against the in-memory server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import huggingface_hub.constants
import pytest
from hub_server import HubServer
from test_checkpoint import TOKEN, Run, assert_same_state

from tiny_audio.checkpoint import (
    MANIFEST,
    MODEL_CONFIG_FILE,
    PROJECTOR_FILE,
    RESUME_DIR,
    CheckpointStore,
    read_checkpoint,
)
from tiny_audio.config import HubConfig
from tiny_audio.errors import UserError
from tiny_audio.hub import (
    HubRepo,
    RetryPolicy,
    bound_http_timeouts,
    is_retryable,
    require_token,
)

REPO = "me/tiny-run"
FAST = RetryPolicy(attempts=4, initial_s=0.01, max_s=0.05)
RESUME_FILES = {
    "projector.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng.safetensors",
    "rng.json",
    "train_state.json",
    "data_state.json",
    "config.json",
    MANIFEST,
}


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    # conftest sets HF_HUB_OFFLINE=1 so nothing reaches the real Hub; these tests talk to 127.0.0.1 only
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer(token=TOKEN) as hub_server:
        yield hub_server


def open_store(
    server: HubServer,
    output_dir: Path,
    *,
    interval: float = 0.0,
    flush_s: float = 30.0,
    retry: RetryPolicy = FAST,
    token: str = TOKEN,
) -> CheckpointStore:
    return CheckpointStore.open(
        target=REPO,
        output_dir=output_dir,
        token=token,
        keep=2,
        endpoint=server.endpoint,
        retry=retry,
        hub=HubConfig(min_upload_interval_s=interval, flush_timeout_s=flush_s),
    )


def commit_attempts(server: HubServer) -> int:
    return sum(1 for line in server.requests if line.startswith("POST") and "/commit/" in line)


def test_each_save_is_one_commit_with_the_model_at_the_root_and_resume_files_below(
    server: HubServer, tmp_path: Path
) -> None:
    run = Run()
    store = open_store(server, tmp_path)
    assert server.repos[REPO].private  # created at open, private by default
    for step in (1, 2):
        run.train(1)
        run.save(store, step=step, final=step == 2)
        assert store.flush(timeout=30)
        if step == 1:  # a file an older checkpoint had and the next one lacks: its commit must delete it
            server.repos[REPO].commits[-1].files[f"{RESUME_DIR}/stale.bin"] = b"old"
    store.close()
    commits = server.commits(REPO)
    assert [c.message for c in commits] == ["step 1", "step 2 (final)"]
    files = commits[-1].files
    root = {p for p in files if "/" not in p}
    assert {PROJECTOR_FILE, MODEL_CONFIG_FILE, "README.md"} <= root
    assert {p.removeprefix(f"{RESUME_DIR}/") for p in files if p.startswith(f"{RESUME_DIR}/")} == RESUME_FILES
    assert json.loads(files[f"{RESUME_DIR}/{MANIFEST}"])["step"] == 2
    assert "Step 2." in files["README.md"].decode()
    assert store.status | {"last_error": None} == {
        "backend": f"hub:{REPO}",
        "uploads_ok": 2,
        "uploads_failed": 0,
        "uploads_coalesced": 0,
        "pending": 0,
        "last_uploaded_step": 2,
        "last_error": None,
    }


def test_saves_within_the_upload_interval_coalesce_into_the_newest(server: HubServer, tmp_path: Path) -> None:
    run = Run()
    store = open_store(server, tmp_path, interval=60)
    run.save(store, step=1)  # the first upload starts at once
    deadline = time.monotonic() + 20
    while store.status["uploads_ok"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    for step in (2, 3, 4):  # all inside the 60 s interval: they wait, each replacing the one before
        run.train(1)
        run.save(store, step=step)
    assert store.status["pending"] == 1 and len(server.commits(REPO)) == 1
    assert store.flush(timeout=30)  # flushing does not wait for the interval
    store.close()
    assert [c.message for c in server.commits(REPO)] == ["step 1", "step 4"]
    assert store.status["uploads_coalesced"] == 2


def test_fetch_latest_in_a_fresh_output_dir_downloads_only_the_resume_files(server: HubServer, tmp_path: Path) -> None:
    run = Run()
    run.train(2)
    store = open_store(server, tmp_path / "first-pod")
    run.save(store, step=2)
    store.close()

    server.requests.clear()
    fresh_store = open_store(server, tmp_path / "second-pod")
    latest = fresh_store.fetch_latest()
    assert latest is not None and latest.is_relative_to(tmp_path / "second-pod")
    downloaded = [
        line.split("/resolve/")[1] for line in server.requests if line.startswith("GET") and "/resolve/" in line
    ]
    assert downloaded and all(f"/{RESUME_DIR}/" in f"/{path}" for path in downloaded)
    assert {p.name for p in latest.iterdir()} == RESUME_FILES
    fresh = Run(seed=11)
    train_state, data_state = read_checkpoint(
        latest, projector=fresh.projector, optimizer=fresh.optimizer, scheduler=fresh.scheduler, config=run.config
    )
    assert train_state["step"] == 2 and data_state == {"epoch": 0, "position": 4}
    assert_same_state(run, fresh)
    fresh_store.close()

    assert open_store(server, tmp_path / "empty", token=TOKEN).fetch_latest() is not None
    with HubServer(token=TOKEN) as empty_server:
        assert open_store(empty_server, tmp_path / "nothing").fetch_latest() is None


def test_newer_local_checkpoint_wins_over_an_older_remote_one(server: HubServer, tmp_path: Path) -> None:
    run = Run()
    store = open_store(server, tmp_path)
    run.save(store, step=1)
    assert store.flush(timeout=30)
    server.inject("/commit/", status=500, times=None)  # step 2 never reaches the Hub
    run.save(store, step=2)
    assert not store.flush(timeout=30)
    store.close()
    server.clear_faults()
    assert open_store(server, tmp_path).fetch_latest() == tmp_path / "checkpoints" / "step-00000002" / RESUME_DIR


@pytest.mark.parametrize("fault", [{"status": 429}, {"status": 500}, {"status": 503}, {"kind": "drop"}])
def test_transient_upload_failures_are_retried(server: HubServer, tmp_path: Path, fault: dict) -> None:
    run = Run()
    store = open_store(server, tmp_path)
    server.inject("/commit/", times=2, **fault)
    run.save(store, step=1)
    assert store.flush(timeout=30)
    store.close()
    assert commit_attempts(server) == 3
    assert [c.message for c in server.commits(REPO)] == ["step 1"]
    assert store.status["uploads_ok"] == 1 and store.status["uploads_failed"] == 0


def test_transient_download_failures_are_retried(server: HubServer, tmp_path: Path) -> None:
    run = Run()
    store = open_store(server, tmp_path / "a")
    run.save(store, step=1)
    store.close()
    server.inject("GET /api/models/", status=500, times=1)  # the listing snapshot_download starts with
    server.inject("GET /me/tiny-run/resolve/", kind="drop", times=1)
    server.inject(f"/{RESUME_DIR}/{MANIFEST}", status=429, times=1)
    latest = open_store(server, tmp_path / "b").fetch_latest()
    assert latest is not None and (latest / MANIFEST).is_file()
    assert all(f.times == 0 for f in server.faults)


def test_a_failing_upload_never_raises_and_the_next_save_uploads_the_newest(
    server: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = Run()
    store = open_store(server, tmp_path)
    server.inject("/commit/", status=500, times=None)
    with caplog.at_level(logging.WARNING, logger="tiny_audio"):
        run.save(store, step=1)  # returns at once: the upload runs in the background
        assert not store.flush(timeout=30)
    status = store.status
    assert status["uploads_failed"] >= 1 and status["uploads_ok"] == 0 and status["last_uploaded_step"] is None
    assert "500" in status["last_error"]
    assert "upload of step 1" in caplog.text and "failed" in caplog.text
    assert server.commits(REPO) == []

    server.clear_faults()
    run.train(1)
    run.save(store, step=2)
    assert store.flush(timeout=30)
    store.close()
    assert [c.message for c in server.commits(REPO)] == ["step 2"]
    assert store.status["last_uploaded_step"] == 2


def test_flush_gives_up_at_its_timeout(server: HubServer, tmp_path: Path) -> None:
    run = Run()
    store = open_store(server, tmp_path, flush_s=20)
    server.inject("/commit/", kind="delay", delay_s=3.0)
    run.save(store, step=1)
    started = time.monotonic()
    assert store.flush(timeout=0.5) is False
    assert 0.4 < time.monotonic() - started < 1.5
    assert store.status["pending"] == 1
    started = time.monotonic()
    store.close()  # the caller already waited out a flush: close does not wait flush_timeout_s (20 s) again
    assert time.monotonic() - started < 2.5
    started = time.monotonic()
    store.flush(timeout=5)  # after close: answers at once, never waits for the abandoned thread
    assert time.monotonic() - started < 0.5


def test_close_flushes_within_the_flush_timeout(server: HubServer, tmp_path: Path) -> None:
    run = Run()
    store = open_store(server, tmp_path, flush_s=0.5)
    server.inject("/commit/", kind="delay", delay_s=3.0)
    run.save(store, step=1)
    started = time.monotonic()
    store.close()
    assert 0.4 < time.monotonic() - started < 2.5
    assert store.status["last_uploaded_step"] is None


def test_corrupt_checkpoint_on_the_hub_is_a_user_error(server: HubServer, tmp_path: Path) -> None:
    run = Run()
    store = open_store(server, tmp_path / "a")
    run.save(store, step=1)
    store.close()
    files = server.repos[REPO].commits[-1].files
    files[f"{RESUME_DIR}/{PROJECTOR_FILE}"] = files[f"{RESUME_DIR}/{PROJECTOR_FILE}"][:64]
    with pytest.raises(UserError, match=rf"{RESUME_DIR}/{PROJECTOR_FILE} is truncated"):
        open_store(server, tmp_path / "b").fetch_latest()
    del files[f"{RESUME_DIR}/optimizer.pt"]
    with pytest.raises(UserError, match=r"optimizer\.pt is missing"):
        open_store(server, tmp_path / "c").fetch_latest()
    del files[f"{RESUME_DIR}/{MANIFEST}"]
    with pytest.raises(UserError, match=r"manifest\.json is missing"):
        open_store(server, tmp_path / "d").fetch_latest()


def test_token_appears_in_no_file_and_no_log_line(
    server: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = Run()
    caplog.set_level(logging.DEBUG)  # huggingface_hub, httpx and ours, at their most talkative
    server.inject("/commit/", status=429, times=1)
    store = open_store(server, tmp_path / "a")
    run.save(store, step=1)
    assert store.flush(timeout=30)
    store.close()
    open_store(server, tmp_path / "b").fetch_latest()
    assert "retry 1/3" in caplog.text  # the retry was logged...
    assert TOKEN not in caplog.text  # ...without the token
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert TOKEN.encode() not in written
    assert all(TOKEN.encode() not in data for c in server.commits(REPO) for data in c.files.values())


def test_token_rules(server: HubServer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="set HF_TOKEN"):
        require_token("me/run", None)
    require_token("me/run", None, write=False)  # public reads need none
    require_token("file:///tmp/x", None)
    require_token(None, None)
    with pytest.raises(UserError, match="write token"):
        open_store(server, tmp_path, token="hf_" + "x" * 34)  # the server refuses it: 401


def test_only_transient_errors_are_retried(server: HubServer, tmp_path: Path) -> None:
    repo = HubRepo(repo_id="me/absent", token=TOKEN, endpoint=server.endpoint, retry=FAST)
    assert repo.has_file("x") is False  # 404 repo: answered at once
    server.inject("/resolve/", status=404, times=None)
    before = len(server.requests)
    assert repo.download_file("x", local_dir=tmp_path) is None
    assert len(server.requests) - before == 1  # a 404 is not retried
    assert not is_retryable(ValueError("no"))
    assert is_retryable(ConnectionResetError())


def test_a_stalled_request_times_out_and_is_retried(server: HubServer, tmp_path: Path) -> None:
    run = Run()
    store = open_store(server, tmp_path)
    assert httpx2.Timeout(300.0, connect=30.0) == huggingface_hub.get_session().timeout  # never unbounded
    previous = bound_http_timeouts(httpx2.Timeout(0.5), force=True)  # short, so the test stays quick
    try:
        server.inject("/commit/", kind="delay", delay_s=3.0)  # the first commit stalls past the timeout
        run.save(store, step=1)
        assert store.flush(timeout=30)
    finally:
        bound_http_timeouts(previous, force=True)
    store.close()
    assert commit_attempts(server) == 2
    assert store.status["uploads_ok"] == 1
