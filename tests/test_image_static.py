"""Static checks of the image's files, run with every test run (each well under a second, no container engine).

The Dockerfile is parsed with BuildKit's own parser (the `dockerfile` package); hadolint, actionlint,
check-jsonschema and shellcheck are the real linters. docker/start.sh's launch logic is checked by running it
with START_DRY_RUN=1, which prints the command it would exec.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
START = ROOT / "docker" / "start.sh"
SECRET_WORDS = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|APIKEY|PRIVATE|CREDENTIAL", re.IGNORECASE)


def _tool(name: str) -> str:
    """The linter from this environment's bin/ (dev extras), else PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed: `make setup` installs the dev extras"
    return found


def _run(*command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def commands() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def _stages(commands: tuple[dockerfile.Command, ...]) -> dict[str, list[dockerfile.Command]]:
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] = []
    for command in commands:
        if command.cmd == "FROM":
            assert len(command.value) == 3 and command.value[1].upper() == "AS", f"unnamed stage: {command.original}"
            current = stages.setdefault(command.value[2], [command])
        elif stages:
            current.append(command)
    return stages


def test_hadolint() -> None:
    done = _run(_tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE))
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint() -> None:
    assert WORKFLOWS, "no workflows"
    done = _run(_tool("actionlint"), *map(str, WORKFLOWS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_workflows_match_the_github_schema() -> None:
    done = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck() -> None:
    done = _run(_tool("shellcheck"), str(START), str(ROOT / ".ci" / "run"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_default_base_image_is_fully_qualified_and_pinned(commands: tuple[dockerfile.Command, ...]) -> None:
    first = commands[0]
    assert first.cmd == "ARG" and first.value[0].startswith("BASE_IMAGE="), "BASE_IMAGE must be the first line"
    image = first.value[0].removeprefix("BASE_IMAGE=")
    registry, _, rest = image.partition("/")
    assert "." in registry, f"podman refuses short names: {image}"
    assert ":" in rest and not rest.endswith(":latest"), f"pin a tag: {image}"
    assert commands[1].cmd == "FROM" and commands[1].value[0] == "${BASE_IMAGE}"
    assert not DOCKERFILE.read_text().startswith("# syntax"), "a syntax line makes BuildKit pull a frontend"


def test_entrypoint_is_exec_form_under_an_init(commands: tuple[dockerfile.Command, ...]) -> None:
    final = _stages(commands)["runtime"]
    (entrypoint,) = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json, "shell-form ENTRYPOINT runs under /bin/sh -c, which does not pass SIGTERM on"
    assert Path(entrypoint.value[0]).name == "tini" and entrypoint.value[-1] == "/app/docker/start.sh"
    assert list(_stages(commands))[-1] == "runtime", "the last stage is the image that runs"


def test_no_secret_in_build_args_or_env(commands: tuple[dockerfile.Command, ...]) -> None:
    for command in commands:
        if command.cmd in ("ARG", "ENV"):
            names = [v.split("=", 1)[0] for v in command.value] if command.cmd == "ARG" else list(command.value[::2])
            assert not [n for n in names if SECRET_WORDS.search(n)], f"secret-like name in {command.original}"
    secret_runs = [c for c in commands if c.cmd == "RUN" and "type=secret" in " ".join(c.flags)]
    assert secret_runs and all("required=false" in " ".join(c.flags) for c in secret_runs)


def test_dependencies_are_installed_before_the_source_is_copied(commands: tuple[dockerfile.Command, ...]) -> None:
    sequence = [(c.cmd, " ".join(c.value)) for c in commands]
    copy_pyproject = sequence.index(("COPY", "pyproject.toml docker/constraints.txt ./"))
    install = next(i for i, (cmd, text) in enumerate(sequence) if cmd == "RUN" and "-r /tmp/requirements.txt" in text)
    assert "-c constraints.txt" in sequence[install][1], "the image installs the tested versions"
    copy_source = next(i for i, (cmd, text) in enumerate(sequence) if cmd == "COPY" and text.startswith(". "))
    assert copy_pyproject < install < copy_source
    smoke = next(i for i, (cmd, text) in enumerate(sequence) if cmd == "RUN" and "tiny-audio --help" in text)
    assert smoke > copy_source, "a build-time smoke run of the entrypoint's --help"


def test_oci_labels_come_from_build_args(commands: tuple[dockerfile.Command, ...]) -> None:
    labels = {}
    for command in commands:
        if command.cmd == "LABEL":
            labels.update(zip(command.value[::2], (v.strip('"') for v in command.value[1::2]), strict=True))
    for key, arg in (("source", "SOURCE"), ("version", "VERSION"), ("revision", "REVISION")):
        assert labels[f"org.opencontainers.image.{key}"] == f"${{{arg}}}"


def test_caches_and_outputs_live_on_the_workspace_volume(commands: tuple[dockerfile.Command, ...]) -> None:
    env = {}
    for command in commands:
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    assert env["HF_HOME"].startswith("/workspace/") and env["WANDB_DIR"].startswith("/workspace")


def test_dockerignore_keeps_secrets_outputs_and_caches_out() -> None:
    patterns = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", "outputs", ".venv", ".git", "wandb", "**/__pycache__", ".pytest_cache", "tests"} <= patterns


def _dry_run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "START_DRY_RUN": "1", "EXP": "tiny"}
    return _run("bash", str(START), *args, env={**base, **env})


def test_start_runs_one_process_without_gpu() -> None:
    done = _dry_run("training.max_steps=5", NUM_GPUS="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [sys.executable, str(ROOT / "entrypoint.py"), "train", "training.max_steps=5"]
    assert "no GPU visible" in done.stderr


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]


def test_start_launches_one_process_per_gpu() -> None:
    done = _dry_run("train", "training.max_steps=5", NUM_GPUS="4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        *ACCELERATE,
        *("--num_processes", "4", "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", "29500"),
        *(str(ROOT / "entrypoint.py"), "train", "training.max_steps=5"),
    ]


def test_start_process_count_overrides() -> None:
    fewer = _dry_run(NUM_GPUS="8", NUM_PROCESSES="2", MAIN_PROCESS_PORT="29600").stdout.split()
    assert fewer[: len(ACCELERATE)] == ACCELERATE and fewer[fewer.index("--num_processes") + 1] == "2"
    assert fewer[fewer.index("--main_process_port") + 1] == "29600"
    one = _dry_run(NUM_GPUS="8", NUM_PROCESSES="1").stdout.split()
    assert one[:3] == [sys.executable, str(ROOT / "entrypoint.py"), "train"]
    # Several processes without a GPU: on CPU, said to accelerate (else each would run as rank 0 of 1).
    cpu = _dry_run(NUM_GPUS="0", NUM_PROCESSES="2")
    assert cpu.stdout.split()[: 2 + len(ACCELERATE)] == ["env", "ACCELERATE_USE_CPU=true", *ACCELERATE], cpu.stderr


def test_start_several_machines() -> None:
    done = _dry_run(NUM_GPUS="8", NUM_MACHINES="2", MACHINE_RANK="1", MAIN_PROCESS_IP="10.0.0.1")
    text = done.stdout
    assert "--num_processes 16 --num_machines 2 --dynamo_backend no --machine_rank 1 --main_process_ip 10.0.0.1" in text
    assert "--main_process_port 29500" in text, done.stderr
    missing = _dry_run(NUM_GPUS="8", NUM_MACHINES="2")
    assert missing.returncode == 2 and "MAIN_PROCESS_IP" in missing.stderr
    # On a RunPod Instant Cluster the cluster's own variables are enough; ours override them.
    cluster = {"NUM_NODES": "2", "NODE_RANK": "1", "PRIMARY_ADDR": "10.65.0.2", "PRIMARY_PORT": "5000"}
    words = _dry_run(NUM_GPUS="8", **cluster).stdout
    assert "--num_processes 16 --num_machines 2 --dynamo_backend no --machine_rank 1" in words
    assert "--main_process_ip 10.65.0.2" in words
    assert "--main_process_port 5000" in words
    ours = _dry_run(NUM_GPUS="8", MACHINE_RANK="0", MAIN_PROCESS_PORT="29500", **cluster).stdout
    assert "--machine_rank 0 --main_process_ip 10.65.0.2 --main_process_port 29500" in ours
    # A machine without GPU still joins a multi-machine run as one process.
    worker = _dry_run(NUM_GPUS="0", NUM_MACHINES="2", MACHINE_RANK="1", MAIN_PROCESS_IP="10.0.0.1").stdout
    assert "--num_processes 2 --num_machines 2" in worker and worker.startswith("env ACCELERATE_USE_CPU=true")


def test_start_refuses_a_real_experiment_without_gpu_in_one_line() -> None:
    done = _dry_run(EXP="mlp", NUM_GPUS="0")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "ALLOW_CPU=1" in done.stderr


def test_start_rejects_a_bad_process_count() -> None:
    done = _dry_run(NUM_GPUS="1", NUM_PROCESSES="0")
    assert done.returncode == 2 and "NUM_PROCESSES" in done.stderr


def _make(*args: str) -> list[str]:
    done = _run("make", "-n", *args)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.strip()]


def test_push_image_pushes_revision_and_latest_to_the_registry() -> None:
    lines = _make("push-image", "DOCKER=podman", "REGISTRY=127.0.0.1:5000", "OWNER=me", "TAG=abc", "PUSH_ARGS=-q")
    assert "podman push -q 127.0.0.1:5000/me/tiny-audio:abc" in lines
    assert "podman push -q 127.0.0.1:5000/me/tiny-audio:latest" in lines


def test_make_train_goes_through_the_start_script() -> None:
    (line,) = [x for x in _make("train", "EXP=mlp", "ARGS=training.max_steps=5") if "start.sh" in x]
    assert "EXP=mlp" in line and line.endswith("docker/start.sh train training.max_steps=5")
    assert f"PYTHON={ROOT}/.venv/bin/python" in line


@pytest.mark.slow
def test_start_launches_two_real_processes_on_cpu(tmp_path: Path) -> None:
    """What start.sh builds for NUM_PROCESSES=2 on a machine without GPU really trains with a world size of 2."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "EXP": "tiny",
        "NUM_GPUS": "0",
        "NUM_PROCESSES": "2",
        "MAIN_PROCESS_PORT": "29517",
        "OUTPUT_DIR": str(tmp_path / "out"),
        "OMP_NUM_THREADS": "1",
    }
    overrides = ["training.max_steps=2", "training.batch_size=2", "data.eval=null", "tracking.mode=disabled"]
    done = _run("bash", str(START), *overrides, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "processes: 2 " in done.stdout, done.stdout[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "step-00000002").is_dir()


def test_build_image_passes_base_wheels_and_labels() -> None:
    (line,) = [" ".join(_make("build-image", "BASE_IMAGE=localhost/b:1", "WHEELS=/w", "PIP_CA=/ca.pem", "TAG=t"))]
    for part in (
        "--build-arg BASE_IMAGE=localhost/b:1",
        "--volume /w:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX_URL=",
        "--secret id=pip_ca,src=/ca.pem",
        "--build-arg REVISION=",
        "-t ghcr.io/tiny-audio/tiny-audio:t -t ghcr.io/tiny-audio/tiny-audio:latest",
    ):
        assert part in line


def test_publish_workflow_pushes_to_ghcr_with_provenance_and_sbom() -> None:
    publish = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text())
    job = publish["jobs"]["image"]
    assert job["permissions"] == {"contents": "read", "packages": "write"}
    steps = {s.get("uses", "").split("@")[0]: s for s in job["steps"]}
    build = steps["docker/build-push-action"]["with"]
    assert build["cache-from"] == "type=gha" and build["cache-to"].startswith("type=gha")
    assert build["provenance"] and build["sbom"] is True
    assert steps["docker/login-action"]["with"]["password"] == "${{ secrets.GITHUB_TOKEN }}"
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    assert [s["run"] for s in ci["jobs"]["test"]["steps"] if "run" in s][-1] == "make test"
