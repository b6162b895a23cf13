"""A full volume, a read-only one, an out-of-memory GPU: one line each, nothing lost; a long wait shows progress.

The volumes are real small file systems (tmpfs, mounted as root or through passwordless sudo), so ENOSPC comes
from the kernel. The disk fills (or the GPU runs out of memory) in the middle of an in-process run of the real
command line, at a chosen projector forward, through a module forward hook.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from click.testing import CliRunner

from tests.ci import unavailable
from tests.hub_server import HubServer
from tests.runs import QUICK
from tiny_audio import hub, progress
from tiny_audio.checkpoint import RESUME_DIR, verify_checkpoint
from tiny_audio.cli import app
from tiny_audio.data import build_eval_set, build_train_stream
from tiny_audio.errors import EXIT_OUT_OF_MEMORY, DiskFull, OutOfGpuMemory
from tiny_audio.experiments import load_config
from tiny_audio.model.projectors.mlp import MLPProjector
from tiny_audio.space import free_bytes
from tiny_audio.volume import KNOWN_DOWNLOAD_BYTES, checkpoint_bytes, plan_space

pytestmark = pytest.mark.usefixtures("restore_logging")  # commands configure logging (conftest.py)
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_spaceTestTokenValue0123456789abc"
BYTES = r"\d+(\.\d)? [kMG]?B"  # as progress.format_bytes writes a size


# --- small real volumes ------------------------------------------------------------------------------------


def _mount_command() -> list[str] | None:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`volume(megabytes, read_only=False)`: a fresh tmpfs of that size, unmounted after the test."""
    prefix = _mount_command()
    if prefix is None:
        unavailable("mounting a small tmpfs needs root or passwordless sudo")
    mounted: list[Path] = []

    def mount(megabytes: float, *, read_only: bool = False) -> Path:
        where = tmp_path / f"volume{len(mounted)}"
        where.mkdir()
        options = f"size={int(megabytes * 1024)}k,uid={os.getuid()},gid={os.getgid()}" + (",ro" if read_only else "")
        subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run([*_mount_command(), "umount", "-l", str(where)], check=False)  # type: ignore[misc]


def fill(where: Path, *, leave: int) -> Path:
    """Write a file taking all of `where`'s file system but `leave` bytes."""
    filler = where / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * max(free_bytes(where) - leave, 0))
    return filler


# --- the command line, in this process ---------------------------------------------------------------------


def train(output_dir: Path, *overrides: str, env: dict[str, str] | None = None):
    """`tiny-audio train` on the tiny experiment, in this process (so a forward hook can inject a fault)."""
    base = {"EXP": "tiny", "OUTPUT_DIR": str(output_dir), "HF_TOKEN": None, "HUB_MODEL_ID": None}
    return CliRunner().invoke(app, ["train", *QUICK, *overrides], env={**base, **(env or {})}, prog_name="tiny-audio")


def one_error_line(result, code: int = 2) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, result.output[-3000:], result.exception)
    assert len(lines) == 1 and "Traceback" not in result.output, lines  # one line, no traceback
    assert lines[0].startswith("error: ")
    return lines[0]


class AtProjectorCall:
    """A global forward hook: runs `action` when the projector's forward returns for the `nth` time."""

    def __init__(self, nth: int, action: Callable[[], None]) -> None:
        self.nth, self.action, self.calls = nth, action, 0

    def __enter__(self) -> AtProjectorCall:
        self.handle = torch.nn.modules.module.register_module_forward_hook(self.hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def hook(self, module: torch.nn.Module, args: object, output: object) -> None:
        if isinstance(module, MLPProjector) and module.training:
            self.calls += 1
            if self.calls == self.nth:
                self.action()


def train_losses(output_dir: Path) -> dict[int, float]:
    """Training loss per step from metrics.jsonl; a step logged twice (before and after a restart): the later."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


# --- a full volume -----------------------------------------------------------------------------------------


def test_a_save_that_does_not_fit_is_one_line_and_a_restart_with_room_resumes_exactly(
    volume: Callable[..., Path],
) -> None:
    steps = ["training.max_steps=6", "training.save_steps=2"]
    disk = volume(8)
    out = disk / "out"
    # the volume fills while step 3 runs (another writer, say): step 2's checkpoint is there, step 4's cannot fit
    filler: list[Path] = []
    with AtProjectorCall(3, lambda: filler.append(fill(disk, leave=300_000))):
        full = train(out, *steps)
    line = one_error_line(full)
    checkpoints = out / "checkpoints"
    assert line.startswith(f"error: no space left on the volume at {checkpoints} while saving the checkpoint of step 4")
    assert re.search(r": \d+ kB free, a checkpoint needs ~1\.\d MB \(step-00000002's size\); ", line), line
    assert "the partial checkpoint was removed and nothing of it uploaded" in line
    assert "the last good checkpoint is step-00000002, and a restart resumes from it" in line
    assert "training.keep_checkpoints=2" in line
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]  # no .tmp-step-* left
    verify_checkpoint(checkpoints / "step-00000002" / RESUME_DIR)
    # steps 3 and 4 ran (and were logged) before step 4's save failed: the uninterrupted run's losses
    uninterrupted = train_losses(out)
    assert sorted(uninterrupted) == [1, 2, 3, 4]

    filler[0].unlink()  # room again: the restart resumes from step 2 and repeats those losses exactly
    again = train(out, *steps)
    assert again.exit_code == 0, again.output[-3000:]
    assert "resumed from" in again.output and "at step 2" in again.output
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, 7))
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004", "step-00000006"]


def test_a_volume_that_fills_under_wandb_offline_is_still_one_line(volume: Callable[..., Path]) -> None:
    # W&B writes its offline files and debug logs on the same volume; its failures to write (and to close its
    # logs while the run is cleaned up) must not add lines or replace the first error
    disk = volume(40)
    out = disk / "out"
    with AtProjectorCall(3, lambda: fill(disk, leave=20_000)):
        result = train(
            out,
            "training.max_steps=30",
            "training.save_steps=20",
            "tracking.mode=offline",
            env={"WANDB_MODE": None, "WANDB_SILENT": "true"},
        )
    line = one_error_line(result)
    assert line.startswith(f"error: no space left on the volume at {out}"), line
    assert not list(out.glob("checkpoints/.tmp-*"))


def test_a_full_metrics_file_is_one_line_naming_it(tmp_path: Path) -> None:
    # /dev/full answers every write with ENOSPC: a metrics.jsonl that is a link to it is a full disk for that file
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    line = one_error_line(train(out, "training.max_steps=2", "training.save_steps=2"))
    assert re.fullmatch(
        rf"error: no space left on the volume at {out} while writing metrics\.jsonl: \d+ GB free: free space or use "
        "a larger volume",
        line,
    ), line


@pytest.mark.parametrize("read_only", [True, False])
def test_an_output_dir_that_cannot_be_written_is_one_line_before_anything_loads(
    tmp_path: Path, volume: Callable[..., Path], read_only: bool
) -> None:
    if read_only:
        out = volume(1, read_only=True) / "out"
        reason = "Read-only file system"
    else:
        (tmp_path / "a-file").write_text("")
        out = tmp_path / "a-file" / "out"  # cannot be created: its parent is a file
        reason = "Not a directory"
    line = one_error_line(train(out, "training.max_steps=2"))
    assert line == (
        f"error: OUTPUT_DIR {out} cannot be written ({reason}): set OUTPUT_DIR to a writable folder, e.g. on the "
        "mounted volume"
    )


def test_a_volume_too_small_for_the_checkpoints_is_refused_at_start(
    tmp_path: Path, volume: Callable[..., Path]
) -> None:
    disk = volume(2)
    line = one_error_line(train(disk / "out", "training.max_steps=2"))
    assert re.fullmatch(
        rf"error: not enough space for this run on {disk}: 2\.\d MB free, the run needs ~\d\.\d MB \(checkpoints "
        rf"\d\.\d MB \(3 x 1\.\d MB\), W&B and metrics files {BYTES}\): free {BYTES} more, lower "
        r"training\.keep_checkpoints, or use a larger volume",
        line,
    ), line
    assert not (disk / "out" / "checkpoints").exists()


def test_check_prints_what_the_run_needs_and_names_a_volume_too_small(
    tmp_path: Path, volume: Callable[..., Path]
) -> None:
    base = {"EXP": "tiny", "HF_TOKEN": None, "HUB_MODEL_ID": None}
    roomy = CliRunner().invoke(app, ["check"], env={**base, "OUTPUT_DIR": str(tmp_path / "out")})
    assert roomy.exit_code == 0, roomy.output
    assert re.search(
        rf"^volume:     needs ~{BYTES} on /\S* \(checkpoints {BYTES} \(3 x 1\.\d MB\), W&B and metrics files "
        rf"{BYTES}\), {BYTES} free$",
        roomy.stdout,
        re.MULTILINE,
    ), roomy.stdout
    assert not (tmp_path / "out").exists()  # check writes nothing
    disk = volume(2)
    small = CliRunner().invoke(app, ["check"], env={**base, "OUTPUT_DIR": str(disk / "out")})
    line = one_error_line(small)
    assert line.startswith(f"error: not enough space for this run on {disk}: 2.1 MB free"), line
    assert small.stdout.strip().endswith("result: 1 problem(s)")


@pytest.mark.slow  # a subprocess: ~15 s of imports
def test_the_entrypoint_refuses_a_volume_too_small_in_one_line(volume: Callable[..., Path]) -> None:
    disk = volume(2)
    env = {**os.environ, "EXP": "tiny", "OUTPUT_DIR": str(disk / "out")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "entrypoint.py"), "train", *QUICK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: not enough space for this run on {disk}: "), lines


# --- models on a Hub: sizes before downloading, progress while downloading, a cache that is full --------------


@pytest.fixture
def model_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dirs: tuple[Path, Path]
) -> Iterator[HubServer]:
    """A local Hub holding the tiny encoder and decoder as `org/encoder` and `org/decoder`; HF_HOME in tmp_path."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    use_hf_home(monkeypatch, tmp_path / "hf-home")
    with HubServer(token=TOKEN) as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.endpoint)
        template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        for name, folder in zip(("org/encoder", "org/decoder"), tiny_model_dirs, strict=True):
            repo = hub.HubRepo(name, token=TOKEN, endpoint=server.endpoint)
            repo.ensure_exists(private=False)
            repo.upload_folder(folder, message="model")
        yield server


def use_hf_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))


def hub_models(*overrides: str):
    return load_config("tiny", ["model.encoder_id=org/encoder", "model.decoder_id=org/decoder", *QUICK, *overrides])


def test_model_sizes_come_from_the_hubs_metadata_and_a_cached_model_needs_nothing(
    model_hub: HubServer, tmp_path: Path, tiny_model_dirs: tuple[Path, Path]
) -> None:
    cfg = hub_models()
    plan = plan_space(cfg, output_dir=tmp_path / "out", token=TOKEN)
    models = plan.needs[0]
    encoder, decoder = tiny_model_dirs
    decoder_bytes = sum(p.stat().st_size for p in decoder.iterdir())
    # the encoder's tower only: more than its small files, less than its whole checkpoint
    tower_and_small = models.bytes - decoder_bytes
    small = sum(p.stat().st_size for p in encoder.iterdir() if p.suffix != ".safetensors")
    assert small < tower_and_small < small + (encoder / "model.safetensors").stat().st_size
    assert model_hub.bytes_served < 64_000  # the safetensors header, not the weights
    assert not list((tmp_path / "hf-home").rglob("*.safetensors"))

    from tiny_audio.model.loading import build_model

    build_model(cfg, device=torch.device("cpu"), token=TOKEN)
    assert plan_space(cfg, output_dir=tmp_path / "out", token=TOKEN).needs[0].bytes == 0


def test_offline_the_public_models_sizes_come_from_the_table(tmp_path: Path) -> None:
    cfg = load_config("mlp", [])
    plan = plan_space(cfg, output_dir=tmp_path / "out", token=None)
    models = plan.needs[0]
    assert models.bytes == KNOWN_DOWNLOAD_BYTES["zai-org/GLM-ASR-Nano-2512"] + KNOWN_DOWNLOAD_BYTES["Qwen/Qwen3-0.6B"]
    # 12.6M fp32 parameters x 4 copies (resume weights, Adam's two moments, the exported weights) + tokenizer
    assert checkpoint_bytes(cfg) == 12_585_984 * 16 + 12_000_000 + 200_000  # (no output scale: the mlp has 1,024 fewer)


def test_too_small_a_volume_for_the_models_is_refused_before_any_download(
    model_hub: HubServer, tmp_path: Path, volume: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = volume(0.4)  # the tiny encoder's tower and decoder take ~0.5 MB
    use_hf_home(monkeypatch, disk / "hf-home")
    overrides = ["model.encoder_id=org/encoder", "model.decoder_id=org/decoder", "training.max_steps=2"]
    line = one_error_line(train(disk / "out", *overrides, env={"HF_TOKEN": TOKEN}))
    assert line.startswith(f"error: not enough space for this run on {disk}: "), line
    assert re.search(rf"\(models to download {BYTES}, W&B and metrics files {BYTES}\)", line), line
    assert not (disk / "hf-home").exists()  # nothing downloaded
    assert model_hub.bytes_served < 64_000


def test_a_read_only_cache_that_must_receive_models_is_refused_before_any_download(
    model_hub: HubServer, tmp_path: Path, volume: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = volume(4, read_only=True)
    use_hf_home(monkeypatch, home)
    overrides = ["model.encoder_id=org/encoder", "model.decoder_id=org/decoder", "training.max_steps=2"]
    line = one_error_line(train(tmp_path / "out", *overrides, env={"HF_TOKEN": TOKEN}))
    assert re.fullmatch(
        rf"error: the Hugging Face cache HF_HOME={home} is not writable, and this run must download ~{BYTES} of "
        r"models into it: point HF_HOME at a writable folder",
        line,
    ), line
    assert model_hub.bytes_served < 64_000


def test_a_full_cache_while_downloading_is_one_line_naming_hf_home(
    model_hub: HubServer, volume: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = volume(1)
    home = disk / "hf-home"
    use_hf_home(monkeypatch, home)
    filler = fill(disk, leave=100_000)  # the tiny decoder's weights take ~370 kB
    with pytest.raises(DiskFull) as caught:
        hub.download_model("org/decoder", revision=None, token=TOKEN)
    message = str(caught.value)
    assert caught.value.exit_code == 2, message
    assert re.fullmatch(
        rf"no space left on the volume at {home} while downloading org/decoder into the Hugging Face cache "
        r"\(HF_HOME\): \d+ kB free, the download needs ~\d+ kB: free space on the volume, use a larger one, or "
        r"point HF_HOME at a bigger disk",
        message,
    ), message
    # the encoder's tower part: the same line, and no half-written part left behind
    filler.unlink()
    shutil.rmtree(home)
    fill(disk, leave=40_000)  # its small files fit, its tower (~120 kB) does not
    with pytest.raises(DiskFull) as caught:
        hub.download_model_part("org/encoder", prefixes=("audio_tower.",), revision=None, token=TOKEN)
    assert "while downloading org/encoder" in str(caught.value)
    assert not list(home.rglob("*.partial"))


def test_a_slow_download_logs_its_progress_in_lines(
    model_hub: HubServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "INTERVAL_S", 0.05)
    # the weights arrive 16 kB at a time, and are written as they arrive (small write chunks for tiny files)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16_000)
    monkeypatch.setattr(hub.parts, "_CHUNK", 16_000)
    model_hub.inject("GET /org/decoder/resolve/", kind="trickle", delay_s=0.03, times=None)
    model_hub.inject("GET /org/encoder/resolve/", kind="trickle", delay_s=0.03, times=None)
    with caplog.at_level(logging.INFO, logger="tiny_audio"):
        hub.download_model("org/decoder", revision=None, token=TOKEN)
        hub.download_model_part("org/encoder", prefixes=("audio_tower.",), revision=None, token=TOKEN)
    lines = caplog.messages

    def partway(prefix: str) -> list[tuple[str, str, int]]:
        """(done, total, percent) of the progress lines starting with `prefix`."""
        found = [re.fullmatch(rf"{re.escape(prefix)}({BYTES}) of ({BYTES}) \((\d+)%\), {BYTES}/s(, ~\d+ s left)?", m)
                 for m in lines]  # fmt: skip
        return [(f[1], f[3], int(f[5])) for f in found if f]

    start = next(m for m in lines if m.startswith("download org/decoder: "))
    total = re.fullmatch(rf"download org/decoder: ({BYTES}) in 6 files into HF_HOME \(.*hf-home\)", start)
    assert total, start
    decoder = partway("download org/decoder: ")
    assert any(0 < percent < 100 for _, _, percent in decoder), lines  # bytes seen arriving, not only the end
    assert all(of == total[1] for _, of, _ in decoder)
    assert f"download org/decoder: done, {total[1]}" in lines  # what arrived in the cache is what the Hub listed
    tower = partway("download org/encoder (audio_tower tensors only): ")
    assert any(0 < percent < 100 for _, _, percent in tower), lines
    assert any(m.startswith("fetched 0.1 MB of org/encoder/model.safetensors") for m in lines)


# --- the first data -----------------------------------------------------------------------------------------


def test_the_first_data_reports_rows_read_while_it_waits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "INTERVAL_S", 0.001)  # the tiny data arrives in well under a second
    cfg = load_config("tiny", ["data.eval_samples=16"])
    with caplog.at_level(logging.INFO, logger="tiny_audio"):
        build_eval_set(data=cfg.data, batch_size=4)
        with build_train_stream(data=cfg.data, batch_size=4, seed=0) as stream:
            next(stream)
            first = len(caplog.messages)
            next(stream)
    assert any(re.fullmatch(r"eval set: [\d,]+ rows read from 1/1 shards so far \(0 s\)", m) for m in caplog.messages)
    waits = [m for m in caplog.messages if m.startswith("data: waiting for the first training batch, ")]
    assert waits and all(re.search(r", [\d,]+ rows read so far \(0 s\)$", m) for m in waits), waits
    assert len(caplog.messages) == first  # the next batches are not announced


# --- out of GPU memory -------------------------------------------------------------------------------------


def test_out_of_memory_at_a_step_is_one_line_with_its_own_exit_code(tmp_path: Path) -> None:
    def out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    out = tmp_path / "out"
    with AtProjectorCall(3, out_of_memory):
        result = train(out, "training.max_steps=6", "training.save_steps=2")
    line = one_error_line(result, code=EXIT_OUT_OF_MEMORY)
    assert line == (
        "error: out of GPU memory at step 3 with a micro-batch of 8: set training.batch_size=4 and "
        "training.global_batch_size=8 to keep the global batch of 8 (2 micro-batches per step); the last "
        "checkpoint step-00000002 is intact and a restart resumes from it"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    verify_checkpoint(out / "checkpoints" / "step-00000002" / RESUME_DIR)


def test_the_help_documents_the_out_of_memory_exit_code() -> None:
    result = CliRunner().invoke(app, ["train", "--help"], prog_name="tiny-audio")
    assert result.exit_code == 0
    assert f"| {EXIT_OUT_OF_MEMORY} out of" in result.output and "GPU memory" in result.output


@pytest.mark.parametrize(
    ("micro", "global_batch", "processes", "fix"),
    [
        (16, 32, 1, "set training.batch_size=8 (training.global_batch_size=32 is kept through gradient "
                    "accumulation: 4 micro-batches per step)"),
        (16, 32, 2, "set training.batch_size=8 (training.global_batch_size=32 is kept through gradient "
                    "accumulation: 2 micro-batches per step)"),
        (12, 36, 1, "set training.batch_size=6 (training.global_batch_size=36 is kept through gradient "
                    "accumulation: 6 micro-batches per step)"),
        (10, 30, 1, "set training.batch_size=5 (training.global_batch_size=30 is kept through gradient "
                    "accumulation: 6 micro-batches per step)"),
        (9, 27, 1, "set training.batch_size=3 (training.global_batch_size=27 is kept through gradient "
                   "accumulation: 9 micro-batches per step)"),
        (1, 32, 1, "a micro-batch of 1 does not fit: lower data.max_seconds or use a GPU with more memory"),
    ],
)  # fmt: skip
def test_out_of_memory_says_which_micro_batch_keeps_the_global_batch(
    micro: int, global_batch: int, processes: int, fix: str
) -> None:
    error = OutOfGpuMemory.at_step(
        step=7, micro_batch=micro, global_batch=global_batch, processes=processes, last_checkpoint=None
    )
    assert str(error) == (
        f"out of GPU memory at step 7 with a micro-batch of {micro}: {fix}; no checkpoint was saved yet"
    )
