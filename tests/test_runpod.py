"""tiny_audio.runpod against a local HTTP server that answers like RunPod's REST API (and fails on demand)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tiny_audio import runpod
from tiny_audio.errors import UserError


@dataclass
class FakeRunPod:
    """Records every request; answers with the queued status codes first, then 200."""

    url: str
    requests: list[dict[str, str]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


@pytest.fixture
def api() -> Iterator[FakeRunPod]:
    state: FakeRunPod

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            state.requests.append(
                {"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization", "")}
            )
            status = state.statuses.pop(0) if state.statuses else 200
            body = json.dumps({"id": self.path.split("/")[2], "desiredStatus": "EXITED"} if status == 200 else {})
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        do_POST = _answer
        do_DELETE = _answer

        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = FakeRunPod(url=f"http://127.0.0.1:{server.server_address[1]}/v1")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_stop_posts_pod_id_with_bearer_key(api: FakeRunPod) -> None:
    runpod.stop_pod(pod_id="pod123", api_key="rp_key", api_url=api.url, wait_s=0)
    assert api.requests == [{"method": "POST", "path": "/v1/pods/pod123/stop", "authorization": "Bearer rp_key"}]


def test_terminate_deletes_the_pod(api: FakeRunPod) -> None:
    runpod.terminate_pod(pod_id="pod123", api_key="rp_key", api_url=api.url, wait_s=0)
    assert api.requests == [{"method": "DELETE", "path": "/v1/pods/pod123", "authorization": "Bearer rp_key"}]


def test_rate_limits_and_server_errors_are_retried(api: FakeRunPod) -> None:
    api.statuses = [503, 429, 500]
    runpod.stop_pod(pod_id="p", api_key="k", api_url=api.url, attempts=4, wait_s=0)
    assert len(api.requests) == 4


def test_gives_up_after_the_attempts(api: FakeRunPod) -> None:
    api.statuses = [502] * 5
    with pytest.raises(runpod.RunPodError, match="502"):
        runpod.stop_pod(pod_id="p", api_key="k", api_url=api.url, attempts=3, wait_s=0)
    assert len(api.requests) == 3


def test_a_bad_key_is_not_retried_and_says_which_variable(api: FakeRunPod) -> None:
    api.statuses = [401]
    with pytest.raises(runpod.RunPodError, match=r"401.*RUNPOD_API_KEY") as raised:
        runpod.terminate_pod(pod_id="p", api_key="secret-key", api_url=api.url, wait_s=0)
    assert len(api.requests) == 1
    assert "secret-key" not in str(raised.value)


def test_unreachable_api_is_retried_then_reported() -> None:
    with pytest.raises(runpod.RunPodError, match="unreachable after 2 attempts"):
        runpod.stop_pod(pod_id="p", api_key="k", api_url="http://127.0.0.1:9", attempts=2, wait_s=0, timeout_s=2)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ON_FINISH": "reboot"}, "not one of exit, sleep, stop, terminate"),
        ({"ON_FINISH": "stop", "RUNPOD_API_KEY": "k"}, "needs RUNPOD_POD_ID"),
        ({"ON_FINISH": "terminate", "RUNPOD_POD_ID": "p"}, "needs RUNPOD_API_KEY"),
    ],
)
def test_wrong_settings_fail_before_training(env: dict[str, str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        runpod.finish_action_from_env(env)


def test_settings_from_env() -> None:
    assert runpod.finish_action_from_env({}).action == "exit"
    action = runpod.finish_action_from_env(
        {"ON_FINISH": "Stop", "RUNPOD_POD_ID": "p", "RUNPOD_API_KEY": "rpa_SECRET", "RUNPOD_API_URL": "http://h/v1/"}
    )
    assert (action.action, action.pod_id, action.api_url) == ("stop", "p", "http://h/v1")
    assert action.api_key == "rpa_SECRET" and "rpa_SECRET" not in repr(action)  # the key stays out of logs


def test_finish_command_stops_the_pod(api: FakeRunPod) -> None:
    env = {"ON_FINISH": "stop", "RUNPOD_POD_ID": "abc", "RUNPOD_API_KEY": "k2", "RUNPOD_API_URL": api.url}
    command = [sys.executable, "-m", "tiny_audio.runpod", "finish"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert api.requests == [{"method": "POST", "path": "/v1/pods/abc/stop", "authorization": "Bearer k2"}]


def _plan(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiny_audio.runpod", "plan", *args], env=env, capture_output=True, text=True
    )


def test_plan_prints_on_finish_and_gpus() -> None:
    done = _plan("training.max_steps=3", EXP="mlp", NUM_GPUS="2", ON_FINISH="sleep")
    assert (done.returncode, done.stdout) == (0, "sleep 2\n"), done.stderr


@pytest.mark.parametrize("experiment", ["tiny", "mini"])
def test_plan_without_gpu_trains_shipped_miniatures_on_cpu_and_says_so(experiment: str) -> None:
    done = _plan(EXP=experiment, NUM_GPUS="0")
    assert (done.returncode, done.stdout) == (0, "exit 0\n"), done.stderr
    assert "no GPU visible" in done.stderr


def test_plan_refuses_a_real_model_without_gpu_whatever_the_experiment_is_called(tmp_path: Path) -> None:
    experiment = tmp_path / "tiny.yaml"  # named like the CPU experiment, but with a real decoder
    experiment.write_text("model:\n  encoder_id: asset://tiny/encoder\n  decoder_id: Qwen/Qwen3-0.6B\n")
    done = _plan(EXP=str(experiment), NUM_GPUS="0")
    assert done.returncode == 2 and "ALLOW_CPU=1" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"NUM_GPUS": "0"}, "no experiment given"),
        ((), {"EXP": "nope", "NUM_GPUS": "1"}, "unknown experiment 'nope'"),
        (("training.nope=1",), {"EXP": "tiny", "NUM_GPUS": "0"}, "unknown key 'training.nope'"),
        ((), {"EXP": "mlp", "NUM_GPUS": "0"}, "ALLOW_CPU=1"),
        ((), {"EXP": "tiny", "NUM_GPUS": "two"}, "NUM_GPUS must be a whole number"),
        ((), {"EXP": "tiny", "NUM_GPUS": "1", "ON_FINISH": "nap"}, "ON_FINISH='nap'"),
    ],
)
def test_plan_mistakes_end_in_one_line_and_exit_2(args: tuple[str, ...], env: dict[str, str], message: str) -> None:
    done = _plan(*args, **env)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and message in done.stderr
    assert done.stdout == ""


def test_plan_allows_cpu_when_asked() -> None:
    assert _plan(EXP="mlp", NUM_GPUS="0", ALLOW_CPU="1").stdout == "exit 0\n"


def _checkpoint(root: Path, name: str, state: dict[str, object]) -> None:
    (root / name).mkdir(parents=True)
    (root / name / runpod.TRAIN_STATE_FILE).write_text(json.dumps(state))


def test_finished_checkpoint_is_the_latest_and_final(tmp_path: Path) -> None:
    assert runpod.finished_checkpoint(tmp_path / "missing") is None
    _checkpoint(tmp_path, "step-900", {"step": 900})
    assert runpod.finished_checkpoint(tmp_path) is None  # interrupted run: resume, do not stop
    _checkpoint(tmp_path, "step-1000", {"step": 1000, "final": True})
    assert runpod.finished_checkpoint(tmp_path) == tmp_path / "step-1000"
    # the step decides, not the directory name; a half-written state file is ignored
    _checkpoint(tmp_path, "a-later-one", {"step": 1100})
    (tmp_path / "zz").mkdir()
    (tmp_path / "zz" / runpod.TRAIN_STATE_FILE).write_text("{")
    assert runpod.finished_checkpoint(tmp_path) is None


def test_finished_checkpoint_reads_the_checkpoint_store_layout(tmp_path: Path) -> None:
    from tiny_audio import checkpoint

    assert runpod.RESUME_DIR == checkpoint.RESUME_DIR
    _checkpoint(tmp_path, f"step-00000100/{checkpoint.RESUME_DIR}", {"step": 100, "final": True})
    assert runpod.finished_checkpoint(tmp_path) == tmp_path / "step-00000100"
    _checkpoint(tmp_path, f".tmp-step-00000200/{checkpoint.RESUME_DIR}", {"step": 200})  # being written
    assert runpod.finished_checkpoint(tmp_path) == tmp_path / "step-00000100"


def test_finished_command_exit_codes(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tiny_audio.runpod", "finished", str(tmp_path)]
    assert subprocess.run(command, capture_output=True).returncode == 1
    _checkpoint(tmp_path, "step-5", {"step": 5, "final": True})
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "step-5")
