"""Where checkpoints are mirrored: a Hub repo (one commit per save) or a directory (e.g. a network volume).

Both hold the newest checkpoint laid out as the Hub repo is: the loadable model at the root, `last-checkpoint/`
with what resuming needs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from tiny_audio.checkpoint.format import MANIFEST, RESUME_DIR, START_FRESH, manifest_step, verify_checkpoint
from tiny_audio.config import HubConfig
from tiny_audio.errors import UserError
from tiny_audio.hub import HubRepo, is_hub_repo, repo_id_of, require_token
from tiny_audio.retry import RetryPolicy


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
                        f"{START_FRESH}"
                    )
                return None
            step = manifest_step(found.parent)
        if step is None:
            raise UserError(
                f"the checkpoint manifest {RESUME_DIR}/{MANIFEST} in {self.description} is corrupt; {START_FRESH}"
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
        try:
            shutil.copytree(checkpoint, staging)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # a copy that did not fit is not left taking the space
            raise
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
