"""tiny_audio.runpod(_api) and docker/start.sh's end of a run against a local stand-in for RunPod's REST API v2
(tests/runpod_server.py): stop and terminate, the price, retries, one-line failures that leave the container
sleeping, ON_FINISH's default on RunPod, and a budget that ends a real (tiny) run as done."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.runpod_server import RunPodV2, serve_runpod_v2
from tests.runs import QUICK
from tiny_audio import runpod, runpod_api
from tiny_audio.errors import UserError
from tiny_audio.retry import RetryPolicy
from tiny_audio.tracking import NullTracker

if TYPE_CHECKING:
    from tiny_audio.train import Run

ROOT = Path(__file__).resolve().parent.parent
START = ROOT / "docker" / "start.sh"
NO_WAIT = RetryPolicy(attempts=4, initial_s=0.0, max_s=0.0)
KEY = "rp_key"


@pytest.fixture
def api() -> Iterator[RunPodV2]:
    with serve_runpod_v2() as state:
        state.add_pod("pod123", cost=0.44)
        yield state


# --- the v2 calls -----------------------------------------------------------------------------------------


def test_stop_posts_the_stop_action_to_v2(api: RunPodV2) -> None:
    runpod_api.stop_pod(pod_id="pod123", api_key=KEY, api_url=api.url, retry=NO_WAIT)
    (call,) = api.calls
    assert (call.method, call.path, call.authorization) == ("POST", "/v2/pods/pod123/action", f"Bearer {KEY}")
    assert call.body == {"action": "stop"}
    assert api.pods["pod123"]["status"] == "EXITED"


def test_terminate_deletes_the_pod(api: RunPodV2) -> None:
    runpod_api.terminate_pod(pod_id="pod123", api_key=KEY, api_url=api.url, retry=NO_WAIT)
    assert [(c.method, c.path, c.body) for c in api.calls] == [
        ("POST", "/v2/pods/pod123/action", {"action": "terminate"})
    ]
    assert "pod123" not in api.pods


def test_the_price_is_the_pods_cost_per_hour(api: RunPodV2) -> None:
    assert runpod_api.pod_price(pod_id="pod123", api_key=KEY, api_url=api.url, retry=NO_WAIT) == 0.44
    assert [(c.method, c.path) for c in api.calls] == [("GET", "/v2/pods/pod123")]


def test_rate_limits_and_server_errors_are_retried(api: RunPodV2) -> None:
    api.fail(503, 429, 500, retry_after="0")
    runpod_api.stop_pod(pod_id="pod123", api_key=KEY, api_url=api.url, retry=NO_WAIT)
    assert len(api.calls) == 4 and api.pods["pod123"]["status"] == "EXITED"


def test_the_wait_a_429_asks_for_is_honoured(api: RunPodV2) -> None:
    import time

    api.fail(429, retry_after="1")
    started = time.monotonic()
    runpod_api.stop_pod(pod_id="pod123", api_key=KEY, api_url=api.url, retry=RetryPolicy(3, initial_s=0.0, max_s=5.0))
    assert time.monotonic() - started >= 1.0 and len(api.calls) == 2


def test_gives_up_after_the_attempts_with_the_servers_problem(api: RunPodV2) -> None:
    api.fail(502, 502, 502, 502)
    with pytest.raises(runpod_api.RunPodError, match=r"502 Bad Gateway after 3 attempts: injected failure") as raised:
        runpod_api.stop_pod(pod_id="pod123", api_key=KEY, api_url=api.url, retry=RetryPolicy(3, 0.0, 0.0))
    assert len(api.calls) == 3 and "\n" not in str(raised.value)


def test_a_bad_key_is_not_retried_and_says_which_variable(api: RunPodV2) -> None:
    with pytest.raises(runpod_api.RunPodError, match=r"401 Unauthorized \(check RUNPOD_API_KEY\): invalid bearer"):
        runpod_api.stop_pod(pod_id="pod123", api_key="secret-key", api_url=api.url, retry=NO_WAIT)
    assert len(api.calls) == 1 and api.pods["pod123"]["status"] == "RUNNING"


def test_an_unknown_pod_is_not_retried_and_says_which_variable(api: RunPodV2) -> None:
    with pytest.raises(runpod_api.RunPodError, match=r"404 Not Found \(check RUNPOD_POD_ID.*\): pod not found"):
        runpod_api.terminate_pod(pod_id="nope", api_key=KEY, api_url=api.url, retry=NO_WAIT)
    assert len(api.calls) == 1


def test_an_unknown_body_field_is_rejected_by_name(api: RunPodV2) -> None:
    """v2 rejects what v1 ignored: a body with a field the schema lacks is a 422 naming it, not a stop."""
    url = f"{api.url}/pods/pod123/action"
    with pytest.raises(runpod_api.RunPodError, match=r"422 .*additional properties 'force' not allowed"):
        runpod_api.request("POST", url, api_key=KEY, body={"action": "stop", "force": True}, retry=NO_WAIT)
    with pytest.raises(runpod_api.RunPodError, match=r"422 .*value must be one of"):
        runpod_api.request("POST", url, api_key=KEY, body={"action": "reset"}, retry=NO_WAIT)  # a v1-only verb
    assert len(api.calls) == 2 and api.pods["pod123"]["status"] == "RUNNING"


def test_the_v1_calls_fail_against_v2(api: RunPodV2) -> None:
    """What the container sent before (v1: `POST /pods/{id}/stop`, no body) is a 404 now, on either base."""
    for url in (f"{api.url}/pods/pod123/stop", api.url.replace("/v2", "/v1") + "/pods/pod123/stop"):
        with pytest.raises(runpod_api.RunPodError, match="404 Not Found"):
            runpod_api.request("POST", url, api_key=KEY, retry=NO_WAIT)
    assert api.pods["pod123"]["status"] == "RUNNING"
    with pytest.raises(UserError, match="REST API v1, which RunPod has retired: unset RUNPOD_API_URL"):
        runpod_api.api_url_from_env({"RUNPOD_API_URL": "https://rest.runpod.io/v1"})
    assert runpod_api.api_url_from_env({}) == "https://api.runpod.io/v2"


def test_an_action_the_pods_status_forbids_is_said(api: RunPodV2) -> None:
    api.add_pod("stopped", status="EXITED")
    with pytest.raises(runpod_api.RunPodError, match="409 Conflict: cannot stop a pod that is EXITED"):
        runpod_api.stop_pod(pod_id="stopped", api_key=KEY, api_url=api.url, retry=NO_WAIT)


def test_unreachable_api_is_retried_then_reported() -> None:
    with pytest.raises(runpod_api.RunPodError, match="unreachable after 2 attempts"):
        runpod_api.stop_pod(pod_id="p", api_key="k", api_url="http://127.0.0.1:9/v2", retry=RetryPolicy(2, 0.0, 0.0))


# --- ON_FINISH: settings and the default on RunPod --------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ON_FINISH": "reboot"}, "not one of exit, sleep, stop, terminate"),
        ({"ON_FINISH": "stop", "RUNPOD_API_KEY": "k"}, "needs RUNPOD_POD_ID"),
        ({"ON_FINISH": "terminate", "RUNPOD_POD_ID": "p"}, "needs RUNPOD_API_KEY"),
        ({"RUNPOD_API_URL": "https://rest.runpod.io/v1/"}, "retired"),
    ],
)
def test_wrong_settings_fail_before_training(env: dict[str, str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        runpod.finish_action_from_env(env)


@pytest.mark.parametrize(
    ("env", "action", "explicit"),
    [
        ({}, "exit", False),  # not on RunPod
        ({"RUNPOD_POD_ID": "p"}, "exit", False),  # on RunPod, but the pod cannot stop itself
        ({"RUNPOD_POD_ID": "p", "RUNPOD_API_KEY": "k"}, "stop", False),  # the default on RunPod
        ({"RUNPOD_POD_ID": "p", "RUNPOD_API_KEY": "k", "ON_FINISH": "exit"}, "exit", True),  # an explicit one wins
        ({"RUNPOD_POD_ID": "p", "RUNPOD_API_KEY": "k", "ON_FINISH": "Sleep"}, "sleep", True),
        ({"RUNPOD_POD_ID": "p", "RUNPOD_API_KEY": "k", "ON_FINISH": "terminate"}, "terminate", True),
    ],
)
def test_on_finish_defaults_to_stop_where_the_pod_can_stop_itself(
    env: dict[str, str], action: str, explicit: bool
) -> None:
    found = runpod.finish_action_from_env(env)
    assert (found.action, found.explicit) == (action, explicit)


def test_settings_from_env_keep_the_key_out_of_logs() -> None:
    action = runpod.finish_action_from_env(
        {"ON_FINISH": "Stop", "RUNPOD_POD_ID": "p", "RUNPOD_API_KEY": "rpa_SECRET", "RUNPOD_API_URL": "http://h/v2/"}
    )
    assert (action.action, action.pod_id, action.api_url) == ("stop", "p", "http://h/v2")
    assert action.api_key == "rpa_SECRET" and "rpa_SECRET" not in repr(action)


def _plan(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiny_audio.runpod", "plan", *args], env=env, capture_output=True, text=True
    )


def test_plan_prints_on_finish_and_gpus() -> None:
    done = _plan("training.max_steps=3", EXP="mlp", NUM_GPUS="2", ON_FINISH="sleep")
    assert (done.returncode, done.stdout, done.stderr) == (0, "sleep 2\n", "")


def test_plan_says_in_one_line_whether_the_pod_stops_billing() -> None:
    can = _plan(EXP="mlp", NUM_GPUS="1", RUNPOD_POD_ID="p", RUNPOD_API_KEY="k")
    assert (can.returncode, can.stdout) == (0, "stop 1\n"), can.stderr
    assert can.stderr.count("\n") == 1 and "the pod stops itself when training ends" in can.stderr
    cannot = _plan(EXP="mlp", NUM_GPUS="1", RUNPOD_POD_ID="p")
    assert (cannot.returncode, cannot.stdout) == (0, "exit 1\n"), cannot.stderr
    assert cannot.stderr.count("\n") == 1 and "keeps billing after training ends" in cannot.stderr
    assert "(RUNPOD_API_KEY is not set); set RUNPOD_API_KEY" in cannot.stderr
    chosen = _plan(EXP="mlp", NUM_GPUS="1", RUNPOD_POD_ID="p", RUNPOD_API_KEY="k", ON_FINISH="sleep")
    assert chosen.stdout == "sleep 1\n" and "keeps billing after training ends (ON_FINISH=sleep)" in chosen.stderr
    assert _plan(EXP="mlp", NUM_GPUS="1").stderr == ""  # not on RunPod: nothing to say


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
        ((), {"EXP": "tiny", "NUM_GPUS": "1", "MAX_HOURS": "ten"}, "MAX_HOURS must be a number > 0"),
        ((), {"EXP": "tiny", "NUM_GPUS": "1", "MAX_COST_USD": "5"}, "needs the machine's price: set COST_PER_HOUR"),
        (("budget.max_hours=0",), {"EXP": "tiny", "NUM_GPUS": "1"}, "budget.max_hours"),
    ],
)
def test_plan_mistakes_end_in_one_line_and_exit_2(args: tuple[str, ...], env: dict[str, str], message: str) -> None:
    done = _plan(*args, **env)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and message in done.stderr
    assert done.stdout == ""


def test_plan_allows_cpu_when_asked() -> None:
    assert _plan(EXP="mlp", NUM_GPUS="0", ALLOW_CPU="1").stdout == "exit 0\n"


# --- the end of a run in docker/start.sh ------------------------------------------------------------------


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def shims(tmp_path: Path) -> Path:
    """A `sleep` that says it was called and returns (start.sh's `exec sleep infinity` would never end), and a
    `python` that stands in for the trainer only (`python .../entrypoint.py ...` exits with TRAINER_EXIT);
    everything else it runs with the real interpreter, so `plan` and `finish` are the real ones."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "sleep", '#!/usr/bin/env bash\necho "container sleeps: sleep $*"\n')
    _executable(
        bin_dir / "python",
        "#!/usr/bin/env bash\n"
        'if [[ "${1:-}" == */entrypoint.py ]]; then echo "trainer: $*"; exit "${TRAINER_EXIT:-0}"; fi\n'
        f'exec {sys.executable} "$@"\n',
    )
    return bin_dir


def _start(shims: Path, *args: str, python: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": f"{shims}:{os.environ['PATH']}",
        "PYTHON": python or str(shims / "python"),
        "EXP": "tiny",
        "NUM_GPUS": "0",
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    return subprocess.run(
        ["bash", str(START), *args], env={**base, **env}, capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def _on_runpod(api: RunPodV2, **env: str) -> dict[str, str]:
    return {"RUNPOD_POD_ID": "pod123", "RUNPOD_API_KEY": KEY, "RUNPOD_API_URL": api.url, **env}


@pytest.mark.parametrize("trainer_exit", ["0", "1"])
def test_a_pod_that_can_stop_itself_stops_when_training_ends(api: RunPodV2, shims: Path, trainer_exit: str) -> None:
    """Done or crashed, the default on RunPod is to stop the pod: an hour of idle GPU costs as much as a trained one."""
    done = _start(shims, **_on_runpod(api, TRAINER_EXIT=trainer_exit))
    assert "trainer: " in done.stdout and "container sleeps: sleep infinity" in done.stdout, done.stderr
    assert f"training ended with exit code {trainer_exit}; ON_FINISH=stop" in done.stderr
    assert [(c.method, c.path, c.body) for c in api.calls] == [("POST", "/v2/pods/pod123/action", {"action": "stop"})]
    assert api.pods["pod123"]["status"] == "EXITED" and "error" not in done.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RUNPOD_API_KEY": "wrong"}, "401 Unauthorized (check RUNPOD_API_KEY): invalid bearer token"),
        ({"RUNPOD_POD_ID": "gone"}, "404 Not Found (check RUNPOD_POD_ID and RUNPOD_API_URL): pod not found"),
    ],
    ids=["bad-key", "unknown-pod"],
)
def test_a_failed_stop_leaves_the_container_sleeping_with_one_line(
    api: RunPodV2, shims: Path, env: dict[str, str], expected: str
) -> None:
    done = _start(shims, **_on_runpod(api, ON_FINISH="stop", **env))
    assert done.stdout.endswith("container sleeps: sleep infinity\n"), done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert "sleeping instead of exiting, so RunPod does not restart the container" in errors[0]
    assert "Traceback" not in done.stderr and "wrong" not in errors[0]  # neither a traceback nor the key
    assert len(api.calls) == 1  # a mistake is not retried


def test_a_stop_through_rate_limits_and_outages(api: RunPodV2, shims: Path) -> None:
    api.fail(429, 503, retry_after="0")
    done = _start(shims, **_on_runpod(api))
    assert api.pods["pod123"]["status"] == "EXITED", done.stderr
    assert done.stderr.count("failed (HTTP 4") == 1 and done.stderr.count("failed (HTTP 5") == 1
    assert len(api.calls) == 3 and "container sleeps" in done.stdout


def test_a_pod_that_cannot_stop_itself_says_so_at_start(api: RunPodV2, shims: Path) -> None:
    done = _start(shims, RUNPOD_POD_ID="pod123", TRAINER_EXIT="0")
    assert done.returncode == 0 and "container sleeps" not in done.stdout, done.stderr
    billing = [line for line in done.stderr.splitlines() if "billing" in line]
    assert len(billing) == 1 and "keeps billing after training ends" in billing[0]
    assert api.calls == []


# --- a finished run ---------------------------------------------------------------------------------------


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


# --- a real (tiny) run: the price once, money beside time, a budget that ends the run as done ----------------

STEP_MONEY = re.compile(r"Step (\d+)/\d+ \| .* \| ETA: \S+ \| \$([\d,.]+) of ~\$([\d,.]+) \| [\d.]+ samples/s")


def _train(output_dir: Path, *overrides: str, target: str | None = None) -> tuple[int, Run]:
    from tiny_audio.experiments import load_config
    from tiny_audio.train import cleanup, setup, train_loop

    cfg = load_config("tiny", [*QUICK, *overrides])
    run = setup(cfg, output_dir=output_dir, token=None, target=target)
    try:
        return train_loop(run), run
    finally:
        cleanup(run)


def _metrics(output_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_price_is_read_once_and_the_costs_follow_from_it(
    api: RunPodV2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    api.pods["pod123"]["cost"] = 36.0  # a cent a second, so that seconds of CPU training show in dollars
    for name, value in _on_runpod(api).items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="tiny_audio"):
        code, run = _train(tmp_path, "training.max_steps=3", "training.resume=false")
    assert code == 0 and run.step == 3
    assert [(c.method, c.path) for c in api.calls] == [("GET", "/v2/pods/pod123")]  # once, at start
    assert "cost: $36.00/hr (RunPod pod pod123) | budget: none" in caplog.text
    lines = [
        (int(s), float(a.replace(",", "")), float(b.replace(",", ""))) for s, a, b in STEP_MONEY.findall(caplog.text)
    ]
    assert [s for s, _, _ in lines] == [1, 2, 3], caplog.text
    assert all(spent <= projected for _, spent, projected in lines)
    assert lines[-1][1] == lines[-1][2]  # nothing left to spend at the last step
    costs = [m for m in _metrics(tmp_path) if "run/cost_usd" in m]
    assert [m["step"] for m in costs] == [1, 2, 3]
    for m in costs:  # what W&B gets: hours at the pod's price
        assert m["run/cost_usd"] == pytest.approx(m["run/hours"] * 36.0)
    assert costs[0]["run/cost_usd"] <= costs[-1]["run/cost_usd"]


def _stored(target: Path) -> dict[str, object]:
    return json.loads((target / "last-checkpoint" / runpod.TRAIN_STATE_FILE).read_text())


def test_a_budget_ends_the_run_as_done_and_a_restart_does_not_train_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    target, out = tmp_path / "store", tmp_path / "out"
    monkeypatch.setenv("COST_PER_HOUR", "3.6")
    monkeypatch.setenv("MAX_HOURS", "1e-9")  # reached at the first check: the first logged step
    with caplog.at_level(logging.INFO, logger="tiny_audio"):
        code, run = _train(out, "training.max_steps=3", target=f"file://{target}")
    assert (code, run.step) == (0, 1)
    assert "budget of 1e-09 h reached" in caplog.text
    assert "saving, uploading and ending the run at step 1 as done" in caplog.text
    first = _stored(target)  # uploaded to the checkpoint target
    assert (first["step"], first["final"]) == (1, False)
    assert first["billing"]["usd"] == pytest.approx(first["billing"]["seconds"] / 1000)  # type: ignore[index]

    caplog.clear()  # a restarted container: same volume, same budget
    with caplog.at_level(logging.INFO, logger="tiny_audio"):
        code, run = _train(out, "training.max_steps=3", target=f"file://{target}")
    assert (code, run.step) == (0, 1)
    assert "raise MAX_HOURS (budget.max_hours) to train on: not training" in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]

    monkeypatch.setenv("MAX_HOURS", "100")  # the budget raised: the run goes on from where it stopped
    code, run = _train(out, "training.max_steps=3", target=f"file://{target}")
    assert (code, run.step) == (0, 3)
    last = _stored(target)
    assert (last["step"], last["final"]) == (3, True)
    assert last["billing"]["seconds"] > first["billing"]["seconds"]  # type: ignore[index]


class AlertRecorder(NullTracker):
    def __init__(self) -> None:
        super().__init__("recorder")
        self.alerts: list[tuple[str, str]] = []

    def alert(self, title: str, text: str) -> None:
        self.alerts.append((title, text))


def test_a_health_warning_is_logged_and_alerted_and_ends_the_run_only_when_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tiny_audio.experiments import load_config
    from tiny_audio.train import cleanup, setup, train_loop

    with_eval = [o for o in QUICK if o != "data.eval=null"]
    base = [*with_eval, "training.max_steps=3", "training.eval_steps=1", "training.resume=false"]
    base += ["data.eval_samples=4", "data.eval_wer_samples=0"]
    # Any eval loss short of a 99% fall in one step counts as stalled: the second evaluation warns.
    strict = ["health.plateau_steps=1", "health.min_improvement=0.99"]
    for stop, steps in (("false", 3), ("true", 2)):
        out = tmp_path / f"stop-{stop}"
        run = setup(
            load_config("tiny", [*base, *strict, f"health.stop_on_warning={stop}"]),
            output_dir=out,
            token=None,
            target=None,
        )
        run.tracker = recorder = AlertRecorder()
        caplog.clear()
        try:
            with caplog.at_level(logging.INFO, logger="tiny_audio"):
                assert train_loop(run) == 0
        finally:
            cleanup(run)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and warnings[0].startswith("health: the eval loss has not fallen 99% in 1 step ")
        assert recorder.alerts == [("tiny-audio: consider cancelling this run", warnings[0])]
        assert run.step == steps, caplog.text
        ended = "health warning (health.stop_on_warning): saving, uploading and ending the run at step 2 as done"
        assert (ended in caplog.text) == (stop == "true")


def test_a_budget_reached_on_a_pod_saves_uploads_and_stops_the_pod(api: RunPodV2, shims: Path, tmp_path: Path) -> None:
    """The whole path on the image's start script: the tiny run reaches MAX_HOURS at its first logged step,
    saves and uploads a checkpoint (a file:/// target), exits 0 as done, and the pod stops itself."""
    target = tmp_path / "store"
    done = _start(
        shims,
        *QUICK,
        "training.max_steps=50",
        python=sys.executable,  # the real trainer
        OUTPUT_DIR=str(tmp_path / "out"),
        HUB_MODEL_ID=f"file://{target}",
        MAX_HOURS="1e-9",
        **_on_runpod(api),
    )
    assert "container sleeps: sleep infinity" in done.stdout, (done.stdout + done.stderr)[-3000:]
    assert "training ended with exit code 0; ON_FINISH=stop" in done.stderr  # done, not crashed
    assert "budget of 1e-09 h reached" in done.stdout and "ending the run at step 1 as done" in done.stdout
    assert STEP_MONEY.search(done.stdout), done.stdout  # the pod's price, read once, beside the time
    state = _stored(target)
    assert (state["step"], state["final"]) == (1, False)
    assert [(c.method, c.path, c.body) for c in api.calls] == [
        ("GET", "/v2/pods/pod123", None),
        ("POST", "/v2/pods/pod123/action", {"action": "stop"}),
    ]
