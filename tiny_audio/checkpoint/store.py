"""The checkpoint store: local checkpoints in OUTPUT_DIR/checkpoints (atomic save, rotation, the latest one), mirrored
to an optional backend in the background, and the handshake by which every process of a run resumes the same one.

    OUTPUT_DIR/checkpoints/
        step-00001000/         a whole checkpoint: the loadable model at the root, last-checkpoint/ inside
        .tmp-step-00002000/    being written (renamed into place when complete, removed if the save fails)
        .downloaded/           the backend's newest, when it was newer than any local one
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tiny_audio import space
from tiny_audio.checkpoint.backends import Backend, HubBackend, open_backend
from tiny_audio.checkpoint.format import RESUME_DIR, manifest_step, verify_checkpoint, write_manifest
from tiny_audio.checkpoint.uploader import Uploader, UploadJob
from tiny_audio.config import HubConfig
from tiny_audio.errors import DiskFull, UserError
from tiny_audio.progress import format_bytes
from tiny_audio.retry import RetryPolicy

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"

_DOWNLOADED = ".downloaded"

_STEP_PREFIX = "step-"


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
            Uploader(backend=backend, min_interval_s=hub.min_upload_interval_s, cancel=cancel or threading.Event())
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
        try:
            (tmp / RESUME_DIR).mkdir(parents=True)
            model_files(tmp)
            write(tmp / RESUME_DIR)
            write_manifest(tmp / RESUME_DIR, step=step)
        except Exception as exc:
            written = space.folder_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint is never left behind
            if space.is_disk_full(exc):
                raise self._disk_full(step, written=written) from None
            raise
        if final_dir.exists():  # saving a step twice (e.g. the final save right after a periodic one)
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        if self._uploader is not None:
            self._uploader.submit(UploadJob(step=step, path=final_dir, final=final))
            self._unflushed = True
        self._rotate(keep_also=final_dir)
        return final_dir

    def last_saved(self) -> Path | None:
        """The newest complete local checkpoint (its folder), None when there is none."""
        checkpoints = self._local_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def _disk_full(self, step: int, *, written: int) -> DiskFull:
        """The one line for a save that found the volume full: what a checkpoint needs, the last good one."""
        previous = self.last_saved()
        if previous is not None:
            need = f"a checkpoint needs ~{format_bytes(space.folder_bytes(previous))} ({previous.name}'s size)"
        elif written:
            need = f"a checkpoint needs more than the {format_bytes(written)} written before the disk filled"
        else:
            need = None
        return space.disk_full(
            folder=self.root,
            doing=f"saving the checkpoint of step {step}",
            need=need,
            cleaned="the partial checkpoint was removed and nothing of it uploaded",
            last_good=previous.name if previous is not None else None,
            fix=(
                f"free space or use a larger volume (training.keep_checkpoints={self.keep} keeps {self.keep} "
                "checkpoints, plus the one being written)"
            ),
        )

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


def find_checkpoint(store: CheckpointStore, accelerator: Accelerator) -> Path | None:
    """The checkpoint every process resumes from: the main process picks (and downloads) it, the others follow.

    Another machine's first process downloads the same checkpoint into its own OUTPUT_DIR when the main
    process's copy is not on its disk.
    """
    acc = accelerator
    chosen: list[Any] = [None, None]
    if acc.is_main_process:
        found = store.fetch_latest()
        chosen = [str(found) if found else None, manifest_step(found) if found else None]
    if acc.num_processes == 1:
        return Path(chosen[0]) if chosen[0] else None
    broadcast_object_list(chosen)
    path, step = chosen
    if path is None:
        return None
    here = Path(path)
    missing = not acc.is_main_process and not here.is_dir()
    if missing and acc.is_local_main_process:
        found = store.fetch_latest(remote=True)
        if found is None or manifest_step(found) != step:
            raise UserError(f"this machine could not fetch the checkpoint of step {step} the main process resumes")
    acc.wait_for_everyone()
    if missing:
        local = store.fetch_latest(remote=False)
        if local is None or manifest_step(local) != step:
            raise UserError(f"this machine has no copy of the checkpoint of step {step} the main process resumes")
        here = local
    return here


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix(_STEP_PREFIX))
