"""A rehearsal of the real run without a GPU: the shipped `mlp`, `mosa` and `moe` experiments, unchanged, through
the image's start script, against the local Hub serving stand-ins of the real repositories under their real names
(tests/real_repos.py: real widths, vocabularies and tensor names; layer counts cut; random weights).

Each experiment trains, pushes its checkpoint to a Hub repo, is stopped with SIGTERM mid-run, starts again on a
"new pod" (an empty volume) that resumes from the Hub and finishes, and is then scored by `eval` and used by
`transcribe`, all through docker/start.sh. Only `training.max_steps`, `training.save_steps` and
`training.eval_steps` are overridden; the served dev split is a few clips, so the recipe's own evaluation
settings hold. Each process's wall time, start-up time and peak memory are printed (`pytest -s` shows them) and
its output is kept in the test's folder (`<label>.log`).

The fast tests at the end check the local Hub's parts the rehearsal relies on (dataset repos, LFS transfers)
and the memory figure itself.
"""

from __future__ import annotations

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
from ci import require_tools
from hub_server import HubServer
from real_repos import (
    GLM_ASR,
    LOQUACIOUS,
    QWEN3_LARGE,
    QWEN3_SMALL,
    SENTENCES,
    build_glm_asr,
    build_loquacious,
    build_qwen3,
    loquacious_texts,
    safetensors_header_bytes,
    tensor_spans,
)

ROOT = Path(__file__).resolve().parent.parent
START = ROOT / "docker" / "start.sh"
TOKEN = "hf_" + "Rh5" * 12
MAX_STEPS = 4
STEPS = [f"training.max_steps={MAX_STEPS}", "training.save_steps=2", f"training.eval_steps={MAX_STEPS}"]
# Trainable projector parameters at the real widths (1280 -> 1024 for mlp, 1280 -> 2048 for mosa and moe), in
# millions as the start-up report rounds them. The mosa and moe figures are those of the reworked projectors.
PROJECTOR_MILLIONS = {"mlp": 12.6, "mosa": 118.1, "moe": 183.6}
TOWER_PREFIX = "audio_tower."
STARTED = r"^decoder\s+trainable"  # the parameter report: models downloaded and loaded


# --- the repositories and the Hub serving them -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four repositories, built once per session in a temporary folder (~1.7 GB, mostly bf16 weights)."""
    require_tools("espeak-ng", hint="apt-get install espeak-ng")
    root = tmp_path_factory.mktemp("real-repos")
    return {
        GLM_ASR: build_glm_asr(root / "glm-asr"),
        QWEN3_SMALL: build_qwen3(root / "qwen3-0.6b", QWEN3_SMALL, texts=SENTENCES),
        QWEN3_LARGE: build_qwen3(root / "qwen3-1.7b", QWEN3_LARGE, texts=SENTENCES),
        LOQUACIOUS: build_loquacious(root / "loquacious"),
    }


@pytest.fixture(scope="module")
def hub(real_repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with HubServer(token=TOKEN, lfs_storage=tmp_path_factory.mktemp("lfs")) as server:
        for repo_id, folder in real_repos.items():
            server.publish(repo_id, folder, repo_type="dataset" if repo_id == LOQUACIOUS else "model")
        yield server


@pytest.mark.slow
def test_the_stand_in_checkpoint_has_the_layout_the_tower_download_must_handle(real_repos: dict[str, Path]) -> None:
    """The tower is a prefix of the first shard, which holds LLM tensors after it; another shard holds no tower."""
    folder = real_repos[GLM_ASR]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tower_files = {f for name, f in weight_map.items() if name.startswith(TOWER_PREFIX)}
    assert len(tower_files) == 1 and len(set(weight_map.values())) == 2
    (tower_file,) = tower_files
    assert any(f == tower_file and not n.startswith(TOWER_PREFIX) for n, f in weight_map.items())
    spans = tensor_spans(folder, TOWER_PREFIX)
    assert min(s.start for s in spans) == safetensors_header_bytes(folder / tower_file)  # a prefix of the data


# --- one process of the rehearsal -----------------------------------------------------------------------------------


class MemoryWatch:
    """Peak memory of a running process, read from /proc every `interval_s`.

    `peak_mb`: the process's own high-water mark (VmHWM: counted from its exec, so unlike the rusage of a child
    forked from a large parent it does not start at the parent's size). `tree_peak_mb`: the largest sum of the
    resident sets of the process and its descendants seen at one reading (W&B's service, for one).
    """

    def __init__(self, pid: int, *, interval_s: float = 0.25) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_mb = 0.0
        self.tree_peak_mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil  # an accelerate dependency

        while not self._done.is_set():
            try:
                process = psutil.Process(self.pid)
                status = Path(f"/proc/{self.pid}/status").read_text()
                tree = [process, *process.children(recursive=True)]
                resident = sum(p.memory_info().rss for p in tree if p.is_running())
            except (OSError, psutil.Error):  # exited between two readings
                return
            if found := re.search(r"^VmHWM:\s+(\d+) kB", status, flags=re.MULTILINE):
                self.peak_mb = max(self.peak_mb, int(found.group(1)) / 1024)
            self.tree_peak_mb = max(self.tree_peak_mb, resident / 2**20)
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)


class Launch:
    """`docker/start.sh ARGS` in a subprocess: its output read as it comes, its memory watched.

    start.sh execs the CLI (ON_FINISH=exit), so the subprocess's pid is the trainer's: a signal sent to it is
    what a pod stop sends, and its memory is the trainer's own.
    """

    def __init__(
        self, args: list[str], *, env: dict[str, str], cwd: Path, label: str, ready: str | None = None
    ) -> None:
        """ready: a pattern of the line that ends the start-up (imports, downloads, model loading), timed."""
        self.label, self.cwd, self.ready = label, cwd, ready
        self.lines: list[str] = []
        self.times: list[float] = []  # seconds since the start, per line
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["bash", str(START), *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.memory = MemoryWatch(self.proc.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.times.append(time.monotonic() - self.started)
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.label}: no line matching {pattern!r}; output:\n{self.output[-6000:]}")

    def finish(self, timeout: float = 600) -> int:
        """Wait for the exit; print wall time and peak memory; return the exit code."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"{self.label}: still running after {timeout:.0f} s:\n{self.output[-6000:]}") from None
        finally:
            self.memory.stop()
        self._reader.join(10)
        seconds = time.monotonic() - self.started
        (self.cwd / f"{self.label.replace(' ', '-').replace(',', '')}.log").write_text(self.output + "\n")
        lines = zip(self.times, self.lines, strict=True)
        ready = next((t for t, line in lines if self.ready and re.search(self.ready, line)), None)
        print(
            f"  {self.label:<16} exit {code:>3} | {seconds:6.1f} s"
            + (f" (start-up {ready:5.1f} s)" if ready is not None else " " * 19)
            + f" | peak RSS {self.memory.peak_mb:6.0f} MB (with child processes {self.memory.tree_peak_mb:6.0f} MB)"
        )
        return code


def environment(hub: HubServer, *, experiment: str, repo: str, work: Path, pod: str) -> dict[str, str]:
    """The container's environment on one pod: `pod` names its volume (HF cache, outputs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "WANDB_", "ON_FINISH", "TINY_AUDIO"))}
    return env | {
        "EXP": experiment,
        "PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(work / pod / "hf-home"),
        "HUB_MODEL_ID": repo,
        "OUTPUT_DIR": str(work / pod / "outputs"),
        "ALLOW_CPU": "1",
        # The Hub takes large files through Xet when hf_xet is installed; the local server speaks only LFS.
        "HF_HUB_DISABLE_XET": "1",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(work / pod),
        "WANDB_SILENT": "true",
    }


def weight_transfers(hub: HubServer, since: int) -> list:
    return [t for t in hub.transfers[since:] if t.repo_id == GLM_ASR and t.path.endswith(".safetensors")]


# --- the rehearsal ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four processes at real widths (~3-4 minutes on 2 busy cores), the first builds the repos
@pytest.mark.parametrize("experiment", ["mlp", "mosa", "moe"])
def test_the_shipped_recipe_trains_stops_resumes_and_serves_on_the_real_repositories(
    experiment: str, hub: HubServer, real_repos: dict[str, Path], tmp_path: Path
) -> None:
    repo = f"rehearsal/tiny-audio-{experiment}"
    env = environment(hub, experiment=experiment, repo=repo, work=tmp_path, pod="pod-1")
    print(f"\n{experiment}:")

    # 1. train until the first checkpoint is on its way, then stop it as a pod stop does
    before = len(hub.transfers)
    first = Launch(STEPS, env=env, cwd=tmp_path, label="train, stopped", ready=STARTED)
    first.wait_for(r"checkpoint step 2 saved", timeout=600)
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 143, first.output[-6000:]
    stopped_at = max(int(n) for n in re.findall(r"checkpoint step (\d+) saved", first.output))
    first_downloads = weight_transfers(hub, before)

    # 2. start again on a new pod (an empty volume): it resumes from the checkpoint on the Hub and finishes
    before = len(hub.transfers)
    env = environment(hub, experiment=experiment, repo=repo, work=tmp_path, pod="pod-2")
    second = Launch(STEPS, env=env, cwd=tmp_path, label="train, resumed", ready=STARTED)
    assert second.finish() == 0, second.output[-6000:]
    assert int(second.wait_for(r"resuming from step (\d+) in hub:").group(1)) == stopped_at
    resumed_at = int(second.wait_for(r"resumed from .* at step (\d+)").group(1))
    assert 2 < resumed_at == stopped_at < MAX_STEPS
    second_downloads = weight_transfers(hub, before)
    after_second = len(hub.transfers)
    manifest = json.loads(hub.repos[repo].files["last-checkpoint/manifest.json"])
    assert manifest["step"] == MAX_STEPS

    # 3. the pushed checkpoint, through the start script's passthrough
    clip = tmp_path / "clip.wav"
    clip.write_bytes(_first_dev_clip(real_repos[LOQUACIOUS]))
    scored = Launch(["eval", "--model", repo], env=env, cwd=tmp_path, label="eval", ready=r"^eval: ")
    assert scored.finish() == 0, scored.output[-6000:]
    heard = Launch(["transcribe", "--model", repo, str(clip)], env=env, cwd=tmp_path, label="transcribe")
    assert heard.finish() == 0, heard.output[-6000:]
    assert heard.wait_for(rf"^{re.escape(str(clip))}\t")
    assert not weight_transfers(hub, after_second), "GLM-ASR weights fetched again though HF_HOME holds the tower"

    # only the tower's bytes of GLM-ASR-Nano-2512 were downloaded: one range per tower shard, and its header twice
    # (the volume check at start sizes the tower from it, then the download reads it)
    folder = real_repos[GLM_ASR]
    spans = tensor_spans(folder, TOWER_PREFIX)
    tower_bytes = sum(s.stop - s.start for s in spans)
    whole_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    expected = {
        name: 2 * safetensors_header_bytes(folder / name)
        + max(s.stop for s in spans if s.file == name)
        - min(s.start for s in spans if s.file == name)
        for name in {s.file for s in spans}
    }
    for downloads in (first_downloads, second_downloads):  # each pod fetches the tower once
        fetched: dict[str, int] = {}
        for t in downloads:
            fetched[t.path] = fetched.get(t.path, 0) + t.bytes
        assert not [t for t in downloads if t.full], "a weight shard of GLM-ASR was downloaded whole"
        assert fetched == expected, f"fetched {fetched}, the tower's ranges are {expected}"
    ranges = sum(expected.values()) - 2 * sum(safetensors_header_bytes(folder / n) for n in expected)
    assert ranges == tower_bytes, "the ranges fetched hold tensors other than the tower's"
    megabytes = [f"{n / 1e6:.1f} MB" for n in (sum(fetched.values()), whole_bytes, tower_bytes)]
    print("  GLM-ASR weights fetched: {} of {} (tower {})".format(*megabytes))

    # transcripts are normalised: the corpus's UPPER-CASE text is scored lower-cased
    dev_texts = loquacious_texts(real_repos[LOQUACIOUS], "dev")
    assert all(t == t.upper() for t in dev_texts)
    results = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert results and sorted(r["reference"] for r in results) == sorted(t.lower() for t in dev_texts)
    refs = re.findall(r"^\s*ref: (.*)$", second.output, flags=re.MULTILINE)
    assert refs and all(r in {t.lower() for t in dev_texts} for r in refs), refs

    # the figures that depend on the projector and prompt work merged from other branches come last
    trainable = int(first.wait_for(r"^projector\s+trainable\s+([\d,]+)").group(1).replace(",", ""))
    print(f"  projector trainable: {trainable:,}; stopped at step {stopped_at}, resumed at {resumed_at}")
    prompt = first.wait_for(r"^prompt: (.*)$").group(1)
    assert prompt.count("<audio>") == 1, prompt
    assert r"<think>\n\n</think>\n\n" in prompt, prompt
    assert round(trainable / 1e6, 1) == PROJECTOR_MILLIONS[experiment]


def _first_dev_clip(folder: Path) -> bytes:
    import pyarrow.parquet as pq

    first = sorted((folder / "dev").glob("*.parquet"))[0]
    return pq.read_table(first)["wav"][0].as_py()["bytes"]


def test_peak_memory_is_the_watched_process_own() -> None:
    """The figure is the child's own, whatever the size of the process that started it."""
    ballast = bytearray(300 << 20)  # this process is large when it starts the children
    ballast[:: 1 << 12] = b"x" * len(ballast[:: 1 << 12])
    figures = []
    for megabytes in (0, 300):
        code = f"import time; b = bytearray({megabytes} << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1)"
        proc = subprocess.Popen([sys.executable, "-c", code])
        watch = MemoryWatch(proc.pid, interval_s=0.05)
        assert proc.wait(30) == 0
        watch.stop()
        figures.append(watch.peak_mb)
    del ballast
    assert figures[0] < 200 < 300 < figures[1]


# --- what the rehearsal relies on: the local Hub's dataset repos and LFS transfers, the memory figure -----------


def test_a_published_dataset_repo_streams_through_datasets(tmp_path: Path) -> None:
    """load_dataset(..., streaming=True) through HF_ENDPOINT reads the README's configs and the shards (via the CDN)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "repo"
    for folder, prefix, texts in (("medium", "train", ["A B", "C D", "E F"]), ("dev", "dev", ["G H"])):
        (repo / folder).mkdir(parents=True)
        pq.write_table(pa.table({"text": texts}), repo / folder / f"{prefix}-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: medium\n  data_files:\n  - split: train\n    path: medium/train*\n"
        "  - split: dev\n    path: dev/dev*\n---\n"
    )
    code = (
        "import datasets, json\n"
        "rows = lambda split: [r['text'] for r in datasets.load_dataset("
        "'org/corpus', name='medium', split=split, streaming=True)]\n"
        "print(json.dumps([rows('train'), rows('dev')]))\n"
    )
    with HubServer(token=TOKEN) as server:
        server.publish("org/corpus", repo, repo_type="dataset")
        env = os.environ | {"HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.splitlines()[-1]) == [["A B", "C D", "E F"], ["G H"]]
        shards = {t.path for t in server.transfers_of("org/corpus", repo_type="dataset") if t.path.endswith("parquet")}
        assert shards == {"medium/train-00000-of-00001.parquet", "dev/dev-00000-of-00001.parquet"}
        assert any(line.startswith("GET cdn:/blobs/") for line in server.requests)  # LFS files: 302 to the CDN


# huggingface_hub's LFS upload hands httpx a file object as `data=`, which httpx deprecates: the library's, not ours
@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_large_uploads_go_through_lfs_and_download_through_the_cdn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from hub_server import LFS_THRESHOLD, Blob
    from huggingface_hub import HfApi, hf_hub_download

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the local Hub speaks LFS only
    folder = tmp_path / "upload"
    folder.mkdir()
    big = os.urandom(LFS_THRESHOLD + 12345)
    (folder / "weights.bin").write_bytes(big)
    (folder / "small.json").write_text("{}")
    with HubServer(token=TOKEN, lfs_storage=tmp_path / "lfs") as server:
        api = HfApi(endpoint=server.endpoint, token=TOKEN)
        api.create_repo("me/model", private=True)
        api.upload_folder(repo_id="me/model", folder_path=folder)
        stored = server.repos["me/model"].files
        assert isinstance(stored["weights.bin"], Blob) and stored["weights.bin"].lfs  # streamed to disk
        assert stored["small.json"] == b"{}"  # inline, held in memory
        assert any(line.startswith("PUT cdn:/upload/") for line in server.requests)
        path = hf_hub_download("me/model", "weights.bin", endpoint=server.endpoint, token=TOKEN, cache_dir=tmp_path)
        assert Path(path).read_bytes() == big
        assert [t.path for t in server.transfers_of("me/model")] == ["lfs/" + stored["weights.bin"].sha256]
