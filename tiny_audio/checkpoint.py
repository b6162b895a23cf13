"""What a checkpoint holds, writing/reading/validating it, and the checkpoint store.

One saved checkpoint is a directory shaped like the Hub repo it is pushed to:

    step-00001000/
        projector.safetensors, tiny_audio_config.json, tokenizer files,   <- a loadable model (the
        preprocessor_config.json, README.md                                  `model_files` callback)
        last-checkpoint/                                                   <- what resuming needs
            projector.safetensors   optimizer.pt   scheduler.pt   rng.safetensors   rng.json
            train_state.json   data_state.json   config.json   manifest.json (names, sizes, sha256)
            ranks.json   (several processes: every rank's data position and Python/numpy RNG; their torch
                          RNG states are in rng.safetensors as rank<r>.torch_cpu / rank<r>.cuda_<i>)

The store keeps the newest `keep` of those in OUTPUT_DIR/checkpoints (written to a temp dir, then renamed,
so a half-written checkpoint is never seen), and mirrors each to a remote backend in the background:
a Hub repo (`user/name`, one commit per save) or a directory (`file:///abs/path`, e.g. a network volume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tiny_audio.config import HubConfig
from tiny_audio.errors import UserError
from tiny_audio.hub import (
    REDACTED,
    HubRepo,
    RetryPolicy,
    describe,
    is_hub_repo,
    repo_id_of,
    require_token,
    scrub,
)

log = logging.getLogger(__name__)

RESUME_DIR = "last-checkpoint"
MANIFEST = "manifest.json"
PROJECTOR_FILE = "projector.safetensors"
MODEL_CONFIG_FILE = "tiny_audio_config.json"
CHECKPOINTS_DIR = "checkpoints"
RANKS_FILE = "ranks.json"
_DOWNLOADED = ".downloaded"
_STEP_PREFIX = "step-"
# Settings that change the projector's parameters or the models it sits between: a checkpoint trained
# with other values cannot be resumed.
COMPATIBILITY_KEYS = (
    ("model", "encoder_id"),
    ("model", "encoder_type"),
    ("model", "decoder_id"),
    ("projector", "type"),
    ("projector", "stack"),
    ("projector", "hidden_dim"),
    ("projector", "num_experts"),
    ("projector", "router_hidden_dim"),
    ("projector", "match_embedding_rms"),
)
_START_FRESH = "to start fresh set training.resume=false, or use a new training.hub_model_id / OUTPUT_DIR"


# --- one checkpoint: write, validate, read ----------------------------------------------------------------


def write_checkpoint(
    directory: Path,
    *,
    projector: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    train_state: dict[str, Any],
    data_state: dict[str, Any],
    config: dict[str, Any],
    export_files: dict[str, Path] | None = None,
    ranks: list[RankState] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Write everything resuming needs into `directory` (created), ending with its manifest.

    projector: the projector module only (its whole state_dict: the trainable weights, never the frozen
    encoder/decoder). train_state: JSON (step, tracker_run_id, metrics, ...). data_state: the data pipeline's
    JSON state. config: the resolved config dict; secrets are scrubbed before writing. export_files: extra
    files copied in as {name in the checkpoint: source path}. ranks: on a multi-process run, every rank's
    `RankState` (gathered to the main process, rank order); None is this process alone. optimizer_state:
    written instead of `optimizer.state_dict()` (DeepSpeed: every rank's ZeRO partition).
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_projector(projector, directory / PROJECTOR_FILE)
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, directory / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    _write_rng(directory, ranks=ranks)
    _write_json(directory / "train_state.json", scrub_config(train_state))
    _write_json(directory / "data_state.json", ranks[0].data if ranks else data_state)
    if ranks and len(ranks) > 1:
        _write_json(directory / RANKS_FILE, {"world_size": len(ranks), "data": [r.data for r in ranks]})
    _write_json(directory / "config.json", scrub_config(config))
    for name, source in (export_files or {}).items():
        shutil.copyfile(source, directory / name)
    write_manifest(directory, step=int(train_state.get("step", 0)))


def read_checkpoint(
    directory: Path,
    *,
    projector: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    config: dict[str, Any] | None = None,
    rank: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate `directory` and restore projector weights, optimizer, scheduler and RNG states from it.

    config: the current run's resolved config; when given, a checkpoint trained with an incompatible one
    (other models, other projector shape) is refused with a UserError saying how to start fresh.
    rank: this process's rank; it gets that rank's RNG states and data position when the checkpoint holds them
    (a rank the checkpoint's run did not have keeps its seeded RNG and starts from the last saved rank's
    data position, which the data stream re-splits for the new world size).
    Returns (train_state, data_state). Raises UserError naming the file when anything is missing or corrupt.
    """
    verify_checkpoint(directory)
    if config is not None:
        check_compatible(stored=read_json(directory / "config.json"), current=config, where=str(directory))
    try:
        # load_state_dict copies into the parameters in place (under DeepSpeed ZeRO they are views into a
        # flat buffer, which safetensors' load_model refuses)
        weights = load_file(str(directory / PROJECTOR_FILE))
        missing, unexpected = unwrap(projector).load_state_dict(weights, strict=False)
    except (SafetensorError, RuntimeError) as exc:
        raise UserError(
            f"{directory / PROJECTOR_FILE} does not fit this projector ({describe(exc)}); {_START_FRESH}"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{directory / PROJECTOR_FILE} does not fit this projector (missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}); {_START_FRESH}"
        )
    if optimizer is not None:
        optimizer.load_state_dict(_load_torch(directory / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(_load_torch(directory / "scheduler.pt"))
    _restore_rng(directory, rank=rank)
    data_state = read_json(directory / "data_state.json")
    if (directory / RANKS_FILE).is_file():
        per_rank = read_json(directory / RANKS_FILE)["data"]
        data_state = per_rank[min(rank, len(per_rank) - 1)]
    return read_json(directory / "train_state.json"), data_state


def write_manifest(directory: Path, *, step: int) -> dict[str, Any]:
    """Record every file under `directory` (name, size, sha256) in manifest.json: the completeness check."""
    files = {
        path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"format": 1, "step": step, "files": files}
    _write_json(directory / MANIFEST, manifest)
    return manifest


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check every file the manifest lists is present, of its size and sha256; the manifest. UserError if not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"checkpoint {directory} is incomplete: {manifest_path} is missing; {_START_FRESH}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"checkpoint manifest {manifest_path} is corrupt; {_START_FRESH}") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"checkpoint {directory} is incomplete: {path} is missing; {_START_FRESH}")
        size = path.stat().st_size
        if size != expected["size"]:
            raise UserError(
                f"checkpoint file {path} is truncated or corrupt ({size} bytes, expected {expected['size']}); "
                f"{_START_FRESH}"
            )
        if _sha256(path) != expected["sha256"]:
            raise UserError(f"checkpoint file {path} is corrupt (sha256 differs from the manifest); {_START_FRESH}")
    return manifest


def check_compatible(*, stored: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """UserError when a stored config differs from the current one in a setting that shapes the model."""
    differences = []
    for section, key in COMPATIBILITY_KEYS:
        old = stored.get(section, {}).get(key)
        new = current.get(section, {}).get(key)
        if old != new:
            differences.append(f"{section}.{key}: checkpoint {old!r}, this run {new!r}")
    if differences:
        raise UserError(
            f"the checkpoint in {where} was trained with another model or projector "
            f"({'; '.join(differences)}); {_START_FRESH}"
        )


# A key that names a secret ends in one of these words (`hf_token`, `WANDB_API_KEY`); `max_new_tokens` does not.
_SECRET_KEY_NAME = re.compile(r"(?:^|_)(?:token|api_key|apikey|secret|password|authorization)$", re.IGNORECASE)


def scrub_config(config: Any, *, secrets: Iterable[str | None] = ()) -> Any:
    """`config` with secrets removed: the given values and anything shaped like a Hub token wherever they occur,
    and the values of keys that name a secret (`hf_token`, `api_key`, ...).

    Unlike `scrub`, a key that merely contains "token" is kept: `max_new_tokens` and `max_label_tokens` are
    settings, and redacting them would make a saved config unloadable.
    """
    if isinstance(config, str):
        return scrub(config, secrets=secrets)
    if isinstance(config, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY_NAME.search(k) and v else scrub_config(v, secrets=secrets)
            for k, v in config.items()
        }
    if isinstance(config, list | tuple):
        return type(config)(scrub_config(v, secrets=secrets) for v in config)
    return config


def save_projector(projector: torch.nn.Module, path: Path) -> None:
    """The projector's weights as safetensors, each tensor copied out on its own: under DeepSpeed ZeRO the
    parameters are views into one flat buffer, which safetensors refuses to save as they are."""
    weights = unwrap(projector).state_dict()
    state = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in weights.items()}
    save_file(state, str(path), metadata={"format": "pt"})


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper: its weights are saved without the `_orig_mod.` prefix, so a
    checkpoint loads the same into a compiled or a plain projector."""
    return getattr(module, "_orig_mod", module)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read checkpoint file {path}: {describe(exc)}") from None


def manifest_step(directory: Path) -> int | None:
    """The step a checkpoint's manifest records, None when there is no readable manifest."""
    try:
        return int(json.loads((directory / MANIFEST).read_text())["step"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_torch(path: Path) -> Any:
    # weights_only: a checkpoint from a Hub repo must not be able to run code when loaded
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise UserError(f"cannot read checkpoint file {path}: {describe(exc)}; {_START_FRESH}") from None


@dataclass
class RankState:
    """What one process must save for itself: its RNG states and its data stream's position."""

    rng: dict[str, Any]  # capture_rng()
    data: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    """This process's Python, numpy and torch (CPU and CUDA) generator states (picklable, for gathering)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch_cpu": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def _write_rng(directory: Path, *, ranks: list[RankState] | None = None) -> None:
    """Python/numpy generator states as JSON, torch CPU/CUDA states as tensors (no pickle either way).

    The top-level entries are rank 0's (this process's when `ranks` is None); with several ranks, each one's
    states are stored too (`ranks` in rng.json, `rank<r>.` tensors).
    """
    states = [r.rng for r in ranks] if ranks else [capture_rng()]
    first = states[0]
    document: dict[str, Any] = {"python": first["python"], "numpy": first["numpy"]}
    tensors = {"torch_cpu": first["torch_cpu"]}
    tensors.update({f"cuda_{i}": t for i, t in enumerate(first["cuda"])})
    if len(states) > 1:
        document["ranks"] = [{"python": st["python"], "numpy": st["numpy"]} for st in states]
        for r, st in enumerate(states):
            tensors[f"rank{r}.torch_cpu"] = st["torch_cpu"]
            tensors.update({f"rank{r}.cuda_{i}": t for i, t in enumerate(st["cuda"])})
    _write_json(directory / "rng.json", document)
    save_file({k: v.clone() for k, v in tensors.items()}, str(directory / "rng.safetensors"))


def _restore_rng(directory: Path, *, rank: int = 0) -> None:
    state = read_json(directory / "rng.json")
    tensors = load_file(str(directory / "rng.safetensors"))
    saved_ranks = state.get("ranks")
    prefix = ""
    if saved_ranks is not None:
        if rank >= len(saved_ranks):
            log.warning(
                "checkpoint holds RNG states for %d processes; rank %d keeps its seeded RNG", len(saved_ranks), rank
            )
            return
        state, prefix = saved_ranks[rank], f"rank{rank}."
    elif rank > 0:
        log.warning("checkpoint was saved by one process; rank %d keeps its seeded RNG", rank)
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors[f"{prefix}torch_cpu"])
    cuda_prefix = f"{prefix}cuda_"
    cuda = [
        tensors[k]
        for k in sorted((k for k in tensors if k.startswith(cuda_prefix)), key=lambda k: int(k[len(cuda_prefix) :]))
    ]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda and torch.cuda.is_available():
        log.warning(
            "checkpoint has CUDA RNG states for %d devices, this run has %d: not restored",
            len(cuda),
            torch.cuda.device_count(),
        )


# --- the loadable model at a checkpoint's (and the repo's) root ---------------------------------------------


def write_model_files(
    directory: Path, *, projector: torch.nn.Module, config: dict[str, Any], card: str | None = None
) -> None:
    """Write the projector weights, the resolved (scrubbed) config and the model card README.md into `directory`.

    The tokenizer and the feature extractor settings (`save_pretrained`) are the caller's to add beside them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_projector(projector, directory / PROJECTOR_FILE)
    _write_json(directory / MODEL_CONFIG_FILE, scrub_config(config))
    if card is not None:
        (directory / "README.md").write_text(scrub(card))


def model_card(*, config: dict[str, Any], step: int, metrics: dict[str, float] | None = None) -> str:
    """A README.md for the repo root: what was trained (experiment, models, projector), at which step, how well."""
    model, projector = config.get("model", {}), config.get("projector", {})
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in sorted((metrics or {}).items()))
    figures = f"| metric | value |\n|---|---|\n{rows}\n" if rows else "No evaluation yet.\n"
    return (
        "---\n"
        "library_name: tiny-audio\n"
        "tags: [automatic-speech-recognition, tiny-audio]\n"
        "pipeline_tag: automatic-speech-recognition\n"
        "---\n\n"
        f"# tiny-audio: {config.get('experiment', '?')}\n\n"
        f"A `{projector.get('type', '?')}` projector (stack {projector.get('stack', '?')}, hidden "
        f"{projector.get('hidden_dim', '?')}) between the frozen encoder `{model.get('encoder_id', '?')}` and the "
        f"frozen decoder `{model.get('decoder_id', '?')}`.\n\n"
        f"Step {step}.\n\n## Latest evaluation\n\n{figures}\n"
        f"`{PROJECTOR_FILE}` holds the projector weights, `{MODEL_CONFIG_FILE}` the resolved config; "
        f"`{RESUME_DIR}/` what resuming the run needs.\n"
    )


# --- backends: where checkpoints are mirrored ---------------------------------------------------------------


class Backend(Protocol):
    """A remote copy of the newest checkpoint: the repo-shaped layout described at the top of this module."""

    description: str

    def latest_step(self) -> int | None:
        """The step of the stored last-checkpoint, None when there is none."""
        ...

    def fetch(self, *, into: Path) -> Path:
        """A local directory holding the stored last-checkpoint (downloaded into `into` when remote)."""
        ...

    def upload(self, checkpoint: Path, *, step: int, final: bool) -> None:
        """Replace the stored checkpoint with the local one at `checkpoint`, as one atomic change."""
        ...


@dataclass
class HubBackend:
    repo: HubRepo

    @property
    def description(self) -> str:
        return f"hub:{self.repo.repo_id}"

    def latest_step(self) -> int | None:
        with tempfile.TemporaryDirectory(prefix="tiny-audio-manifest-") as scratch:
            found = self.repo.download_file(f"{RESUME_DIR}/{MANIFEST}", local_dir=Path(scratch))
            if found is None:
                if self.repo.has_file(f"{RESUME_DIR}/train_state.json"):
                    raise UserError(
                        f"the checkpoint in {self.description} is incomplete: {RESUME_DIR}/{MANIFEST} is missing; "
                        f"{_START_FRESH}"
                    )
                return None
            step = manifest_step(found.parent)
        if step is None:
            raise UserError(
                f"the checkpoint manifest {RESUME_DIR}/{MANIFEST} in {self.description} is corrupt; {_START_FRESH}"
            )
        return step

    def fetch(self, *, into: Path) -> Path:
        return self.repo.download(local_dir=into, allow_patterns=[f"{RESUME_DIR}/*"]) / RESUME_DIR

    def upload(self, checkpoint: Path, *, step: int, final: bool) -> None:
        message = f"step {step}" + (" (final)" if final else "")
        self.repo.upload_folder(checkpoint, message=message, replace_folder=RESUME_DIR)


@dataclass
class FileBackend:
    """A directory laid out like the Hub repo. last-checkpoint/ is swapped by renames; the one it replaces
    stays as .previous-checkpoint/ until the swap is done, so a kill at any moment leaves one whole copy."""

    root: Path

    @property
    def description(self) -> str:
        return f"file://{self.root}"

    def _current(self) -> Path | None:
        for name in (RESUME_DIR, ".previous-checkpoint"):
            if (self.root / name).is_dir():
                return self.root / name
        return None

    def latest_step(self) -> int | None:
        current = self._current()
        if current is None:
            return None
        step = manifest_step(current)
        if step is None:  # a stored checkpoint without a readable manifest is corrupt, not absent
            verify_checkpoint(current)
        return step

    def fetch(self, *, into: Path) -> Path:
        current = self._current()
        if current is None:
            raise UserError(f"no checkpoint in {self.root}")
        return current  # already a local path: nothing to copy

    def upload(self, checkpoint: Path, *, step: int, final: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".incoming-{step:08d}"
        previous = self.root / ".previous-checkpoint"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint, staging)
        if (self.root / RESUME_DIR).is_dir():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(self.root / RESUME_DIR, previous)
        os.replace(staging / RESUME_DIR, self.root / RESUME_DIR)
        for entry in staging.iterdir():  # the loadable model at the root, file by file (each rename atomic)
            target = self.root / entry.name
            if entry.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(entry, target)
        shutil.rmtree(staging)
        shutil.rmtree(previous, ignore_errors=True)


def open_backend(
    target: str | None,
    *,
    token: str | None,
    hub: HubConfig,
    endpoint: str | None = None,
    retry: RetryPolicy | None = None,
) -> Backend | None:
    """`user/name` (or `hf://user/name`) -> HubBackend, `file:///abs/path` -> FileBackend, None -> None."""
    if target is None or target == "":
        return None
    if target.startswith("file:"):
        path = urlsplit(target).path
        if not target.startswith("file:///") or not os.path.isabs(path):
            raise UserError(f"checkpoint target {target} must be file:///absolute/path")
        return FileBackend(root=Path(path))
    if is_hub_repo(target):
        require_token(target, token)
        repo = HubRepo(
            repo_id=repo_id_of(target),
            token=token,
            revision=hub.revision,
            endpoint=endpoint,
            retry=retry or RetryPolicy(),
        )
        return HubBackend(repo=repo)
    raise UserError(f"checkpoint target {target!r} is neither a Hub repo id (user/name) nor file:///abs/path")


def resolve_target(configured: str | None, environ: dict[str, str] | None = None) -> str | None:
    """training.hub_model_id when set, else the HUB_MODEL_ID variable, else None (checkpoints stay local)."""
    environ = dict(os.environ) if environ is None else environ
    return configured or environ.get("HUB_MODEL_ID") or None


# --- the background uploader --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    step: int
    path: Path
    final: bool


class _Uploader:
    """One thread that mirrors saved checkpoints to a backend, newest first, never more often than allowed.

    A save arriving while an upload runs or before `min_interval_s` has passed replaces the waiting one
    (coalescing: the next commit takes the newest state). A failed upload is logged and counted, never raised.
    """

    def __init__(self, *, backend: Backend, min_interval_s: float, cancel: threading.Event) -> None:
        self.backend = backend
        self.min_interval_s = min_interval_s
        self.cancel = cancel
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._running: _Job | None = None
        self._newest: _Job | None = None
        self._hurry = False  # flush: upload now, do not wait for the interval
        self._closed = False
        self._last_start = -float("inf")
        self.ok = self.failed = self.coalesced = 0
        self.last_uploaded_step: int | None = None
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._cond:
            if self._pending is not None:
                self.coalesced += 1
            self._pending = self._newest = job
            self._hurry = self._hurry or job.final
            self._cond.notify_all()

    def busy_paths(self) -> set[Path]:
        """Local checkpoints that must not be rotated away: waiting, uploading, or the newest."""
        with self._cond:
            return {j.path for j in (self._pending, self._running, self._newest) if j is not None}

    def flush(self, timeout: float | None) -> bool:
        """Upload what is waiting now; True when the newest saved state is uploaded within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            newest = self._newest
            if newest is None:
                return True
            if self._closed:  # the thread is gone: report, do not wait
                return self.last_uploaded_step == newest.step
            if self._pending is None and self._running is None and self.last_uploaded_step != newest.step:
                self._pending = newest  # its upload failed earlier: one more try before giving up
            self._hurry = True
            self._cond.notify_all()
            while self._pending is not None or self._running is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    log.warning("checkpoint upload to %s not finished after %.0f s", self.backend.description, timeout)
                    return False
                self._cond.wait(remaining)
            self._hurry = False
            return self.last_uploaded_step == newest.step

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        self.cancel.set()  # stops retries waiting inside a stuck upload
        self._thread.join(timeout=1.0)  # a daemon: one blocked in a request is left behind, not waited for

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "backend": self.backend.description,
                "uploads_ok": self.ok,
                "uploads_failed": self.failed,
                "uploads_coalesced": self.coalesced,
                "pending": int(self._pending is not None) + int(self._running is not None),
                "last_uploaded_step": self.last_uploaded_step,
                "last_error": self.last_error,
            }

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    wait = self._last_start + self.min_interval_s - time.monotonic()
                    if self._pending is not None and (self._hurry or wait <= 0):
                        break
                    self._cond.wait(wait if self._pending is not None else None)
                if self._closed:
                    return
                job, self._pending, self._running = self._pending, None, self._pending
                self._last_start = time.monotonic()
            assert job is not None
            started = time.monotonic()
            try:
                self.backend.upload(job.path, step=job.step, final=job.final)
            except Exception as exc:
                # Any failure (HTTP, disk, a backend bug): an upload must never stop training; logged and counted.
                error = describe(exc)
                log.error(
                    "checkpoint upload of step %d to %s failed: %s (the next save uploads the newest state)",
                    job.step,
                    self.backend.description,
                    error,
                )
                with self._cond:
                    self.failed += 1
                    self.last_error = error
            else:
                log.info(
                    "checkpoint step %d uploaded to %s in %.1f s",
                    job.step,
                    self.backend.description,
                    time.monotonic() - started,
                )
                with self._cond:
                    self.ok += 1
                    self.last_uploaded_step = job.step
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()


# --- the store ----------------------------------------------------------------------------------------------


class CheckpointStore:
    """Local checkpoints in OUTPUT_DIR/checkpoints, mirrored to an optional backend in the background.

    Build it with `CheckpointStore.open(...)`. On a multi-process run only the main process writes and
    uploads; the others read what the main process fetched (call `fetch_latest` on the main process first,
    then barrier, then on the others).
    """

    def __init__(
        self,
        *,
        backend: Backend | None,
        output_dir: Path,
        keep: int,
        hub: HubConfig,
        is_main_process: bool = True,
        cancel: threading.Event | None = None,
    ) -> None:
        self.backend = backend
        self.root = output_dir / CHECKPOINTS_DIR
        self.keep = keep
        self.flush_timeout_s = hub.flush_timeout_s
        self.is_main_process = is_main_process
        self._closed = False
        self._unflushed = False  # a save was made since the last flush
        self._uploader = (
            _Uploader(backend=backend, min_interval_s=hub.min_upload_interval_s, cancel=cancel or threading.Event())
            if backend is not None and is_main_process
            else None
        )

    @classmethod
    def open(
        cls,
        *,
        target: str | None,
        output_dir: Path,
        token: str | None,
        hub: HubConfig,
        keep: int,
        is_main_process: bool = True,
        endpoint: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> CheckpointStore:
        """A store for `target` (`user/name`, `file:///abs/path` or None: OUTPUT_DIR only).

        A Hub target needs `token` (UserError otherwise) and its repo is created now (private per hub.private),
        so a token without write access fails at start-up, not after the first save. `endpoint` and `retry`
        exist for tests (a local Hub server, short waits).
        """
        cancel = threading.Event()
        backend = open_backend(target, token=token, hub=hub, endpoint=endpoint, retry=retry)
        if isinstance(backend, HubBackend):
            backend.repo.cancel = cancel
            if is_main_process:
                backend.repo.ensure_exists(private=hub.private)
        return cls(
            backend=backend, output_dir=output_dir, keep=keep, hub=hub, is_main_process=is_main_process, cancel=cancel
        )

    # -- resume --------------------------------------------------------------------------------------------
    def fetch_latest(self, *, remote: bool | None = None) -> Path | None:
        """The newest checkpoint's resume directory (last-checkpoint contents, verified), or None.

        Looks at the local checkpoints and the backend's; downloads (only last-checkpoint/) when the
        backend's is newer. UserError when the newest one is incomplete or corrupt. remote: whether to ask
        the backend (default: on the main process only; the first process of another machine passes True).
        """
        local = self._local_candidates()
        best = max(local, key=lambda c: c[0]) if local else None
        if self.backend is not None and (self.is_main_process if remote is None else remote):
            remote_step = self.backend.latest_step()
            if remote_step is not None and (best is None or remote_step > best[0]):
                log.info("resuming from step %d in %s", remote_step, self.backend.description)
                best = (remote_step, self.backend.fetch(into=self.root / _DOWNLOADED))
        if best is None:
            return None
        verify_checkpoint(best[1])
        return best[1]

    def _local_candidates(self) -> list[tuple[int, Path]]:
        candidates = [(_step_of(p), p / RESUME_DIR) for p in self._local_checkpoints()]
        downloaded = self.root / _DOWNLOADED / RESUME_DIR
        step = manifest_step(downloaded)
        if step is not None:
            candidates.append((step, downloaded))
        return candidates

    def _local_checkpoints(self) -> list[Path]:
        """Renamed-into-place checkpoints, oldest step first (temp dirs start with '.', never listed)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX)]
        return sorted(found, key=_step_of)

    # -- save ----------------------------------------------------------------------------------------------
    def save(
        self,
        *,
        step: int,
        write: Callable[[Path], None],
        model_files: Callable[[Path], None],
        final: bool = False,
    ) -> Path:
        """Write checkpoint `step` locally and atomically, then queue its upload; returns its local directory.

        write(dir) fills the resume directory (normally `write_checkpoint(dir, ...)`); model_files(dir) fills
        the loadable-model files at the root (`write_model_files` + tokenizer/feature extractor
        save_pretrained). The manifest is (re)written here, after `write`. Returns at once on non-main processes.
        """
        final_dir = self.root / f"{_STEP_PREFIX}{step:08d}"
        if not self.is_main_process:
            return final_dir
        tmp = self.root / f".tmp-{_STEP_PREFIX}{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / RESUME_DIR).mkdir(parents=True)
        model_files(tmp)
        write(tmp / RESUME_DIR)
        write_manifest(tmp / RESUME_DIR, step=step)
        if final_dir.exists():  # saving a step twice (e.g. the final save right after a periodic one)
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        if self._uploader is not None:
            self._uploader.submit(_Job(step=step, path=final_dir, final=final))
            self._unflushed = True
        self._rotate(keep_also=final_dir)
        return final_dir

    def _rotate(self, *, keep_also: Path) -> None:
        busy = self._uploader.busy_paths() if self._uploader else set()
        checkpoints = self._local_checkpoints()
        for old in checkpoints[: max(0, len(checkpoints) - self.keep)]:
            if old != keep_also and old not in busy:
                shutil.rmtree(old, ignore_errors=True)

    # -- uploads -------------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait for pending uploads (at most `timeout` s; None: hub.flush_timeout_s). True when all are up."""
        if self._uploader is None:
            return True
        self._unflushed = False
        return self._uploader.flush(self.flush_timeout_s if timeout is None else timeout)

    def close(self) -> None:
        """Flush (within hub.flush_timeout_s), then stop the uploader. Safe to call twice; status stays readable."""
        # A flush the caller already waited out is not waited for again (a stuck upload would double the wait).
        if self._uploader is not None and not self._closed:
            if self._unflushed:
                self.flush()
            self._uploader.close()
        self._closed = True

    @property
    def status(self) -> dict[str, Any]:
        """For logging: backend, uploads_ok / uploads_failed / uploads_coalesced, pending, last_uploaded_step."""
        if self._uploader is None:
            description = self.backend.description if self.backend else f"local:{self.root}"
            return {
                "backend": description,
                "uploads_ok": 0,
                "uploads_failed": 0,
                "uploads_coalesced": 0,
                "pending": 0,
                "last_uploaded_step": None,
                "last_error": None,
            }
        return self._uploader.status()


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix(_STEP_PREFIX))
