"""The real image, built from the real Dockerfile with podman and run (marker `container`, run by .ci/run).

The base image is made here (mmdebstrap of Debian bookworm, whose python3 is the 3.11 of the CPU torch wheel in
the wheel folder pip's configuration names), so nothing is pulled from an image registry: the build reaches only
the Debian mirror and the Python package index (docs/image.md says how podman is set up here). The image is
built, pushed and pulled through the Makefile's own targets.

Under CI=true a missing tool is a failure, elsewhere a skip. TINY_AUDIO_CONTAINER_DIR names a directory to keep
podman's store in between runs (base image and layer cache survive); by default every session starts empty, so
the build measured is a build from scratch. Durations are printed at the end of the session.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ci import require_tools

pytestmark = [pytest.mark.container, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parent.parent
BASE = "localhost/debian-base:bookworm"
IMAGE = "localhost/tiny-audio-test/tiny-audio"
TOOLS = ("podman", "runc", "mmdebstrap", "docker-registry", "make", "git")
# A run-time secret: passed with -e at every run, it must end up in no layer, log, checkpoint or file.
TOKEN = "hf_" + secrets.token_hex(16)
# Tiny training settings for the runs here: a few steps, a checkpoint every 2, a short evaluation.
FEW_STEPS = ("training.max_steps=4", "training.save_steps=2", "training.logging_steps=1", "data.eval_samples=4")
FIGURES: dict[str, float] = {}


class Podman:
    """podman with a private store and the settings docs/image.md lists (runc, ulimits), as argv and environment."""

    def __init__(self, work: Path, name: str = "store") -> None:
        self.work = work
        conf = work / "containers.conf"
        if not conf.exists():
            import resource

            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            conf.write_text(
                "[containers]\n"
                f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
                "[engine]\n"
                'runtime = "runc"\n'
            )
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.store = work / name
        # podman refuses a runroot path longer than 50 characters; it must also stay the same for a store.
        digest = hashlib.sha256(str(self.store.resolve()).encode()).hexdigest()[:12]
        self.runroot = Path(tempfile.gettempdir()) / f"podman-run-{digest}"
        self.argv = ["podman", "--root", str(self.store / "storage"), "--runroot", str(self.runroot)]

    def remove(self) -> None:
        """Delete the store (images, containers) and its runroot."""
        subprocess.run([*self.argv, "system", "reset", "--force"], env=self.env, capture_output=True)
        shutil.rmtree(self.store, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)

    def __call__(self, *args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        return done

    def make(self, target: str, *variables: str, cwd: Path = ROOT, timeout: float = 1800) -> float:
        """Run a Makefile target with this podman as DOCKER; return its duration in seconds."""
        start = time.monotonic()
        done = subprocess.run(
            ["nice", "-n", "10", "make", "-C", str(cwd), target, f"DOCKER={' '.join(self.argv)}", *variables],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"make {target} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
        return time.monotonic() - start


def _debian_mirror() -> str:
    """The Debian mirror apt on this machine uses (deb822 .sources or one-line sources.list)."""
    apt = Path("/etc/apt")
    for path in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, flags=re.MULTILINE))
            uris, suites = fields.get("URIs", "").split(), fields.get("Suites", "").split()
            if uris and "bookworm" in suites and "deb" in fields.get("Types", "deb").split():
                return uris[0]
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] == ["deb"] and "bookworm" in words and "security" not in line:
                    return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def _wheel_folder() -> Path | None:
    """The local wheel folder pip's configuration names (holds the CPU torch wheel), if any."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
    )
    for candidate in (os.environ.get("PIP_FIND_LINKS", "") + " " + done.stdout).split():
        path = Path(candidate.removeprefix("file://"))
        if path.is_dir() and any(path.glob("torch-*.whl")):
            return path
    return None


def _build_context(destination: Path) -> Path:
    """A copy of the working tree (tracked and untracked files git does not ignore), so a test can edit it."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require_tools(*TOOLS, hint=".ci/run installs them with apt")
    kept = os.environ.get("TINY_AUDIO_CONTAINER_DIR")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        yield Path(kept)
        return
    work = tmp_path_factory.mktemp("podman")
    yield work
    # A few GB of layers: not left behind in pytest's kept temporary directories.
    Podman(work).remove()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def podman(work: Path) -> Podman:
    return Podman(work)


@pytest.fixture(scope="module")
def build_vars(podman: Podman) -> list[str]:
    """The Makefile variables of a test build: the self-made Debian base, CPU torch, the machine's CA for pip."""
    if podman("image", "exists", BASE, check=False).returncode != 0:
        start = time.monotonic()
        debootstrap = subprocess.Popen(
            [
                "nice", "-n", "10", "mmdebstrap", "--quiet", "--variant=apt",
                "--include=python3,python3-venv,ca-certificates", "bookworm", "-", _debian_mirror(),
            ],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        imported = subprocess.run(
            [*podman.argv, "import", "-", BASE], stdin=debootstrap.stdout, env=podman.env, capture_output=True
        )
        assert debootstrap.wait() == 0 and imported.returncode == 0, imported.stderr.decode()[-2000:]
        FIGURES["base image (mmdebstrap + import), s"] = time.monotonic() - start
    variables = [f"BASE_IMAGE={BASE}", "REGISTRY=localhost", "OWNER=tiny-audio-test"]
    wheels = _wheel_folder()
    if wheels:
        variables.append(f"WHEELS={wheels}")
    else:  # no local wheel: PyTorch's CPU index (where it can be reached)
        variables.append("BUILD_ARGS=--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    paths = ssl.get_default_verify_paths()
    ca = next((p for p in (paths.cafile, paths.openssl_cafile) if p and Path(p).is_file()), None)
    if ca:
        variables.append(f"PIP_CA={ca}")
    return variables


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_context(tmp_path_factory.mktemp("context"))


@pytest.fixture(scope="module")
def image(podman: Podman, build_vars: list[str], context: Path) -> str:
    """The image, built by `make build-image` from a copy of the working tree."""
    FIGURES["build (make build-image), s"] = podman.make("build-image", *build_vars, "TAG=test", cwd=context)
    size = podman("image", "inspect", "--format", "{{.Size}}", f"{IMAGE}:test").stdout
    FIGURES["image size (CPU test build, uncompressed), MB"] = int(size) / 1e6
    return f"{IMAGE}:test"


def _run(podman: Podman, image: str, *args: str, env: dict[str, str] | None = None, volume: Path | None = None):
    """`podman run` the image (no network: the tiny experiment and every error path are offline)."""
    options = ["--rm", "--network", "none"]
    for key, value in (env or {}).items():
        options += ["-e", f"{key}={value}"]
    if volume is not None:
        options += ["-v", f"{volume}:/workspace"]
    return podman("run", *options, image, *args, check=False)


def _train_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "last-checkpoint" / "train_state.json").read_text())


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_image_trains_tiny_and_writes_checkpoints_to_the_volume(podman: Podman, image: str, tmp_path: Path) -> None:
    volume = tmp_path / "workspace"
    volume.mkdir()
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    options = ["--name", name, "--network", "none", "-e", "EXP=tiny", "-e", f"HF_TOKEN={TOKEN}"]
    process = subprocess.Popen(
        [*podman.argv, "run", *options, "-v", f"{volume}:/workspace", image, *FEW_STEPS],
        env=podman.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("Step 1/"):
            FIGURES["podman run -> first training step of tiny, s"] = time.monotonic() - start
        lines.append(line)
    output = "".join(lines)
    try:
        assert process.wait(timeout=600) == 0, output[-3000:]
        assert "no GPU visible" in output and "Step 4/4" in output, output[-3000:]
        checkpoints = volume / "outputs" / "tiny" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
        assert _train_state(checkpoints / "step-00000004")["step"] == 4
        assert _train_state(checkpoints / "step-00000004")["final"] is True
        assert (checkpoints / "step-00000004" / "projector.safetensors").stat().st_size > 0

        # The run-time token: not in the output, not on the volume, not in the image's or container's layers.
        assert TOKEN not in output
        assert _files_containing(volume, TOKEN.encode()) == []
        podman("commit", "--quiet", name, f"{IMAGE}:after-run")
        start = time.monotonic()
        found = _scan_saved_image(podman, f"{IMAGE}:after-run", TOKEN.encode())
        FIGURES["podman save + scan for the token, s"] = time.monotonic() - start
        # The committed container's config keeps its environment (`-e HF_TOKEN`): proof that the scan reads the
        # archive. No layer may hold it.
        assert found["config"], "the scan did not see the token even in the config: it reads nothing"
        assert found["layers"] == [], f"the token was written into a layer: {found['layers']}"
    finally:
        podman("rm", "--force", name, check=False)
        podman("rmi", f"{IMAGE}:after-run", check=False)


def _scan_saved_image(podman: Podman, image: str, needle: bytes) -> dict:
    """Stream `podman save` (docker-archive: uncompressed layer tars) and say which members contain `needle`."""
    save = subprocess.Popen(
        [*podman.argv, "save", "--format", "docker-archive", image], env=podman.env, stdout=subprocess.PIPE
    )
    hits, manifest = [], None
    assert save.stdout is not None
    with tarfile.open(fileobj=save.stdout, mode="r|") as archive:
        for member in archive:
            handle = archive.extractfile(member) if member.isreg() else None  # links point at scanned files
            if handle is None:
                continue
            if member.name == "manifest.json":
                data = handle.read()
                manifest = json.loads(data)
                if needle in data:
                    hits.append(member.name)
                continue
            tail = b""
            while chunk := handle.read(1 << 22):
                if needle in tail + chunk:
                    hits.append(member.name)
                    break
                tail = chunk[-len(needle) :]
    assert save.wait() == 0, "podman save failed"
    assert manifest, "no manifest.json in the saved image"
    assert manifest[0]["Layers"], "the saved image lists no layers"
    # Layer contents are the `.tar` members (the manifest's Layers, or what their links point at); the rest is
    # metadata: the config and the legacy per-layer `json`, which carry the container's environment.
    return {
        "config": manifest[0]["Config"] in hits,
        "layers": [h for h in hits if h.endswith(".tar")],
    }


def _seconds_to_first_step(podman: Podman, image: str, volume: Path, *args: str) -> tuple[float, str]:
    """`podman run` the tiny experiment on `volume`; (seconds from start to its first step line, its output)."""
    start, first = time.monotonic(), None
    command = [*podman.argv, "run", "--rm", "--network", "none", "-e", "EXP=tiny", "-v", f"{volume}:/workspace"]
    process = subprocess.Popen(
        [*command, image, *args], env=podman.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        if first is None and line.startswith("Step 1/"):
            first = time.monotonic() - start
        lines.append(line)
    output = "".join(lines)
    assert process.wait(timeout=900) == 0, output[-3000:]
    assert first is not None, output[-3000:]
    return first, output


def test_compiled_training_works_in_the_image_and_reuses_its_kernels_from_the_volume(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    """training.compile=true needs a C compiler at run time (Inductor's CPU kernels; Triton's launcher on a GPU):
    the image carries one, and caches the compiled kernels on the volume, so a second run starts sooner."""
    volume = tmp_path / "workspace"
    volume.mkdir()
    args = ("training.compile=true", "training.max_steps=2", "training.save_steps=2", "training.logging_steps=1")
    args += ("data.eval=null",)
    cold, output = _seconds_to_first_step(podman, image, volume, *args)
    assert "torch.compile failed" not in output, output[-3000:]
    assert any((volume / ".cache" / "torchinductor").iterdir())  # the kernels are on the volume
    shutil.rmtree(volume / "outputs")  # a fresh run (no checkpoint to resume), the same caches
    warm, output = _seconds_to_first_step(podman, image, volume, *args)
    assert "torch.compile failed" not in output, output[-3000:]
    FIGURES["compiled tiny: podman run -> first step, empty volume, s"] = cold
    FIGURES["compiled tiny: podman run -> first step, kernels cached on the volume, s"] = warm
    print(f"compiled tiny, first step after {cold:.1f} s on an empty volume, {warm:.1f} s with the cache")
    assert warm < 0.8 * cold, (cold, warm)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "error: no experiment given: set EXP"),
        ({"EXP": "nope"}, "error: unknown experiment 'nope'"),
        ({"EXP": "mlp"}, "error: no GPU visible, and experiment mlp"),
        ({"EXP": "tiny", "ON_FINISH": "stop"}, "error: ON_FINISH=stop needs RUNPOD_POD_ID"),
    ],
    ids=["no-exp", "unknown-exp", "gpu-experiment-without-gpu", "on-finish-without-pod"],
)
def test_mistakes_end_in_one_line_and_exit_2(podman: Podman, image: str, env: dict, message: str) -> None:
    done = _run(podman, image, env={**env, "HF_TOKEN": TOKEN})
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(message), done.stderr
    assert done.stdout == "" and TOKEN not in done.stderr


def test_help_and_labels(podman: Podman, image: str) -> None:
    done = _run(podman, image, "--help")
    assert done.returncode == 0 and "EXP" in done.stdout and "HF_TOKEN" in done.stdout, done.stderr
    labels = json.loads(podman("inspect", "--format", "{{json .Config.Labels}}", image).stdout)
    assert labels["org.opencontainers.image.version"]
    assert labels["org.opencontainers.image.source"].startswith("https://github.com/")
    config = json.loads(podman("inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "/app/docker/start.sh"]
    assert not [e for e in config["Env"] if re.search(r"TOKEN|API_KEY|SECRET", e.split("=")[0])]


def _wait_for_log(podman: Podman, name: str, pattern: str, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        done = podman("logs", name, check=False)
        logs = done.stdout + done.stderr
        if re.search(pattern, logs):
            return logs
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        assert state == "running", f"container {state} before /{pattern}/ appeared:\n{logs[-3000:]}"
        assert time.monotonic() < deadline, f"no /{pattern}/ within {timeout:.0f} s:\n{logs[-3000:]}"
        time.sleep(1)


def test_sigterm_saves_and_a_restarted_container_resumes(podman: Podman, image: str, tmp_path: Path) -> None:
    """`docker stop` (SIGTERM to tini, PID 1) reaches the trainer, which saves and exits 143; a restart resumes."""
    volume = tmp_path / "workspace"
    volume.mkdir()
    name = f"stop-{uuid.uuid4().hex[:8]}"
    podman(
        "run", "--detach", "--name", name, "--network", "none", "-e", "EXP=tiny", "-v", f"{volume}:/workspace",
        image, "training.max_steps=400", "training.save_steps=1000", "training.eval_steps=1000",
        "training.logging_steps=1",
    )  # fmt: skip
    try:
        _wait_for_log(podman, name, r"Step ([3-9]|\d\d+)/400", timeout=300)
        start = time.monotonic()
        podman("stop", "--time", "120", name, timeout=180)
        FIGURES["podman stop -> checkpoint saved and exited, s"] = time.monotonic() - start
        status = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = podman("logs", name).stdout
        assert status == "143", f"exit {status}:\n{logs[-3000:]}"
        (saved,) = (volume / "outputs" / "tiny" / "checkpoints").iterdir()
        state = _train_state(saved)
        assert 3 <= state["step"] < 400 and state["final"] is False, state
        assert f"checkpoint step {state['step']} saved" in logs

        # RunPod restarts the same container: it resumes at the saved step and trains on.
        podman("start", name)
        step = state["step"]
        _wait_for_log(podman, name, rf"resumed from \S+ at step {step}\b[\s\S]*Step {step + 1}/400", timeout=300)
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """docker-registry (distribution) serving on a free loopback port; yields host:port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp_path / 'registry'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    server = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else "registry died"
                assert time.monotonic() < deadline, "the registry did not answer within 30 s"
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp_path / "registry", ignore_errors=True)


def test_push_image_to_a_registry_then_pull_and_run(
    podman: Podman, image: str, registry: str, work: Path, tmp_path: Path
) -> None:
    pushed = f"{registry}/tiny-audio-test/tiny-audio"
    podman("tag", image, f"{pushed}:test", f"{pushed}:latest")
    try:
        FIGURES["make push-image to a loopback registry, s"] = podman.make(
            "push-image", f"REGISTRY={registry}", "OWNER=tiny-audio-test", "TAG=test", "PUSH_ARGS=--tls-verify=false"
        )
    finally:
        podman("rmi", f"{pushed}:test", f"{pushed}:latest", check=False)
    with urllib.request.urlopen(f"http://{registry}/v2/tiny-audio-test/tiny-audio/tags/list", timeout=10) as answer:
        assert sorted(json.load(answer)["tags"]) == ["latest", "test"]

    # Pull into an empty store, so every layer really comes from the registry.
    fresh = Podman(work, name=f"pull-{uuid.uuid4().hex[:8]}")
    try:
        start = time.monotonic()
        fresh("pull", "--quiet", "--tls-verify=false", f"{pushed}:test")
        FIGURES["podman pull into an empty store, s"] = time.monotonic() - start
        local_id = podman("inspect", "--format", "{{.Id}}", image).stdout.strip()
        assert fresh("inspect", "--format", "{{.Id}}", f"{pushed}:test").stdout.strip() == local_id
        volume = tmp_path / "workspace"
        volume.mkdir()
        done = _run(fresh, f"{pushed}:test", "training.max_steps=2", "data.eval_samples=2", env={"EXP": "tiny"},
                    volume=volume)  # fmt: skip
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "Step 2/2" in done.stdout
        assert _train_state(volume / "outputs" / "tiny" / "checkpoints" / "step-00000002")["final"] is True
    finally:
        fresh.remove()


def test_a_one_line_change_rebuilds_only_the_source_layers(
    podman: Podman, image: str, build_vars: list[str], context: Path
) -> None:
    cli = context / "tiny_audio" / "cli.py"
    original = cli.read_text()
    cli.write_text(original + "\n# a one-line change\n")
    try:
        FIGURES["rebuild after a one-line code change, s"] = podman.make(
            "build-image", *build_vars, "TAG=changed", cwd=context
        )
    finally:
        cli.write_text(original)
    layers = {
        tag: json.loads(podman("inspect", "--format", "{{json .RootFS.Layers}}", f"{IMAGE}:{tag}").stdout)
        for tag in ("test", "changed")
    }
    shared = [a for a, b in zip(layers["test"], layers["changed"], strict=True) if a == b]
    # Base, apt, dependency layers are reused; only the source COPY and the editable install are new.
    assert len(shared) >= len(layers["test"]) - 2 and layers["test"] != layers["changed"], layers
    podman("rmi", f"{IMAGE}:changed", check=False)


@pytest.fixture(scope="module", autouse=True)
def report_timings(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not FIGURES:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line("container figures:")
        for what, value in FIGURES.items():
            reporter.write_line(f"  {what:<48} {value:8.1f}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "container", "-v"]))
