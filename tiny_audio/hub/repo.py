"""One Hub repo, every call retried with the project's one retry policy (tiny_audio.retry); the token rule.

Retries: 408/429/5xx answers (429 as long as Retry-After says, capped), timeouts and dropped connections are
retried with exponential backoff and full jitter; anything else (401, 404, a bad request) fails at once, since
waiting cannot fix it. A set `cancel` event ends pending retries at once (shutdown).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    get_session,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from tiny_audio.errors import UserError
from tiny_audio.redact import redact
from tiny_audio.retry import RetryPolicy, retry_after_s, retry_call

log = logging.getLogger(__name__)


T = TypeVar("T")


RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


# huggingface_hub's shared HTTP client waits forever by default: one stalled connection would hang the
# uploader for the rest of the run. Reads/writes are per network operation, so big files are not cut off.
HTTP_TIMEOUT = httpx2.Timeout(300.0, connect=30.0)


def is_hub_repo(target: str | None) -> bool:
    """`user/name` or `hf://user/name` is a Hub repo; None, `file:///...` and local paths are not."""
    return target is not None and (target.startswith("hf://") or re.fullmatch(r"[\w.-]+/[\w.-]+", target) is not None)


def repo_id_of(target: str) -> str:
    """`hf://user/name` or `user/name` -> `user/name`."""
    return target.removeprefix("hf://")


def require_token(target: str | None, token: str | None, *, write: bool = True) -> None:
    """Raise a UserError before any transfer when `target` is a Hub repo that needs HF_TOKEN and none is set.

    Writing (checkpoints) always needs a token; reading (`write=False`) works without one for public repos,
    so it is only required there when the caller knows the repo is private.
    """
    if is_hub_repo(target) and write and not token:
        raise UserError(
            f"pushing checkpoints to the Hub repo {repo_id_of(target or '')} needs a token: set HF_TOKEN "
            "(a write token from https://huggingface.co/settings/tokens), or set training.hub_model_id to "
            "file:///abs/path or leave it unset to keep checkpoints on disk"
        )


def is_retryable(exc: BaseException) -> bool:
    """True for errors that waiting can fix: 408/429/5xx, timeouts, refused or dropped connections."""
    if isinstance(exc, OfflineModeIsEnabled):  # a ConnectionError, but HF_HUB_OFFLINE=1 will not change by waiting
        return False
    if isinstance(exc, HfHubHTTPError):
        response = exc.response
        return response is not None and response.status_code in RETRYABLE_STATUS
    if isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, LocalEntryNotFoundError):
        # snapshot_download turns a failed listing into "not in the local cache"; the cause says why
        return exc.__cause__ is not None and is_retryable(exc.__cause__)
    return False


def server_wait_s(exc: BaseException) -> float | None:
    """The wait a 429 answer asked for (its Retry-After header), None when it named none."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    return retry_after_s(headers.get("Retry-After")) if headers is not None else None


def describe(exc: BaseException) -> str:
    """One line for logs: the error's class and first line, with secrets removed."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact(f"{type(exc).__name__}: {first}")


def bound_http_timeouts(timeout: httpx2.Timeout = HTTP_TIMEOUT, *, force: bool = False) -> httpx2.Timeout:
    """Give huggingface_hub's shared client `timeout` when it has none (or always, `force`); the previous one.

    A timed-out request raises httpx2.TimeoutException, which `HubRepo` retries like any transient error.
    """
    session = get_session()
    previous = session.timeout
    if force or previous.read is None:
        session.timeout = timeout
    return previous


@dataclass
class HubRepo:
    """One Hub model repo, every call retried. `cancel` set -> pending retries stop at once (shutdown)."""

    repo_id: str
    token: str | None
    revision: str = "main"
    endpoint: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.api = HfApi(endpoint=self.endpoint, token=self.token)
        bound_http_timeouts()

    # The one place calls are retried.
    def _call(self, what: str, fn: Callable[[], T], *, offline_hint: str | None = None) -> T:
        try:
            return retry_call(
                fn,
                what=f"hub: {what} on {self.repo_id}",
                policy=self.retry,
                is_transient=is_retryable,
                cancel=self.cancel,
                server_wait_s=server_wait_s,
                describe_error=describe,
                logger=log,
            )
        except OfflineModeIsEnabled:
            hint = offline_hint or (
                "or set training.hub_model_id to file:///abs/path or leave it unset to keep checkpoints on disk"
            )
            raise UserError(
                f"HF_HUB_OFFLINE is set, but {what} needs the Hub repo {self.repo_id}: unset HF_HUB_OFFLINE, {hint}"
            ) from None

    def ensure_exists(self, *, private: bool) -> None:
        """Create the repo if it does not exist (a UserError when the token may not)."""
        try:
            self._call(
                "create_repo",
                lambda: self.api.create_repo(self.repo_id, private=private, exist_ok=True, repo_type="model"),
            )
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise UserError(
                    f"cannot create or write the Hub repo {self.repo_id} (HTTP {status}): check that HF_TOKEN is a "
                    "write token for that namespace"
                ) from None
            raise

    def has_file(self, path_in_repo: str) -> bool:
        """Whether the repo's revision holds `path_in_repo` (False when the repo itself does not exist)."""
        try:
            return self._call(
                "file_exists",
                lambda: self.api.file_exists(self.repo_id, path_in_repo, revision=self.revision),
            )
        except RepositoryNotFoundError:
            return False

    def download_file(self, path_in_repo: str, *, local_dir: Path) -> Path | None:
        """Download one file into `local_dir` (keeping its repo path); None when the repo or file is absent."""
        try:
            return Path(
                self._call(
                    f"download {path_in_repo}",
                    lambda: hf_hub_download(
                        self.repo_id,
                        path_in_repo,
                        revision=self.revision,
                        local_dir=local_dir,
                        endpoint=self.endpoint,
                        token=self.token,
                    ),
                )
            )
        except (RepositoryNotFoundError, EntryNotFoundError):
            return None

    def download(
        self, *, local_dir: Path, allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None
    ) -> Path:
        """snapshot_download the matching files into `local_dir` (emptied first, so nothing stale survives).

        Resume takes `allow_patterns=["last-checkpoint/*"]`; loading a model takes
        `ignore_patterns=["last-checkpoint/*"]` (the root holds the loadable model).
        """
        # snapshot_download returns an existing local_dir as-is when the Hub cannot be reached: never let a
        # stale copy pass for a fresh download.
        if local_dir.exists():
            shutil.rmtree(local_dir)
        return Path(
            self._call(
                "snapshot_download",
                lambda: snapshot_download(
                    self.repo_id,
                    revision=self.revision,
                    allow_patterns=allow_patterns,
                    ignore_patterns=ignore_patterns,
                    local_dir=local_dir,
                    endpoint=self.endpoint,
                    token=self.token,
                ),
            )
        )

    def upload_folder(self, folder: Path, *, message: str, replace_folder: str | None = None) -> str | None:
        """Upload every file under `folder` as ONE commit; returns the commit oid.

        replace_folder: a folder of the repo (e.g. `last-checkpoint`) whose remote files missing from
        `folder` are deleted in the same commit, so no stale file lingers beside the new ones.

        Built on `create_commit` rather than `upload_folder`: with hf_xet installed, `upload_folder` may split
        a folder into several commits (past ~20 files after a failed commit, or after 5 minutes) and retries
        the commit itself with its own backoff; here one commit is one save, and tenacity does the retrying.
        """
        local = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        stale = set(self._list_files(replace_folder)) - set(local) if replace_folder else set()

        def commit() -> str | None:
            # operations are single-use (the client mutates them): build them afresh for every attempt
            operations: list[CommitOperationAdd | CommitOperationDelete] = [
                CommitOperationDelete(path_in_repo=path, is_folder=False) for path in sorted(stale)
            ]
            operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path in local.items()]
            info = self.api.create_commit(
                self.repo_id, operations, commit_message=message, revision=self.revision, repo_type="model"
            )
            return info.oid

        return self._call("upload", commit)

    def _list_files(self, folder: str) -> list[str]:
        """Paths of the files under `folder` in the repo ([] when the folder or repo does not exist)."""

        def listing() -> list[str]:
            tree = self.api.list_repo_tree(self.repo_id, folder, recursive=True, revision=self.revision)
            return [entry.path for entry in tree if isinstance(entry, RepoFile)]

        try:
            return self._call(f"list {folder}", listing)
        except (RepositoryNotFoundError, EntryNotFoundError):
            return []


def check_access(repo_id: str, *, repo_type: str, token: str | None, endpoint: str | None = None) -> str:
    """Whether `repo_id` can be read with `token`, without downloading it (for `check`).

    Returns "ok", "missing" (does not exist, or private and invisible to this token), "denied" (gated, or
    the token is refused) or "unreachable" (offline, or the Hub did not answer). Never raises, never retries.
    """
    if hub_constants.HF_HUB_OFFLINE:
        return "unreachable"
    bound_http_timeouts()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.repo_info(repo_id, repo_type=repo_type, timeout=10)
    except GatedRepoError:
        return "denied"
    except RepositoryNotFoundError:
        return "missing"
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        return "denied" if status in (401, 403) else "unreachable"
    except (httpx2.TransportError, OSError, OfflineModeIsEnabled):
        return "unreachable"
    return "ok"
