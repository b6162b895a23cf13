"""The background uploader: one thread that mirrors saved checkpoints to a backend while training goes on."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiny_audio.checkpoint.backends import Backend
from tiny_audio.hub import describe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadJob:
    step: int
    path: Path
    final: bool


class Uploader:
    """One thread that mirrors saved checkpoints to a backend, newest first, never more often than allowed.

    A save arriving while an upload runs or before `min_interval_s` has passed replaces the waiting one
    (coalescing: the next commit takes the newest state). A failed upload is logged and counted, never raised.
    """

    def __init__(self, *, backend: Backend, min_interval_s: float, cancel: threading.Event) -> None:
        self.backend = backend
        self.min_interval_s = min_interval_s
        self.cancel = cancel
        self._cond = threading.Condition()
        self._pending: UploadJob | None = None
        self._running: UploadJob | None = None
        self._newest: UploadJob | None = None
        self._hurry = False  # flush: upload now, do not wait for the interval
        self._closed = False
        self._last_start = -float("inf")
        self.ok = self.failed = self.coalesced = 0
        self.last_uploaded_step: int | None = None
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, job: UploadJob) -> None:
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
