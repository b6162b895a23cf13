"""Every call to the Hugging Face Hub, behind retries; plus the rule that pushing needs a token.

Nothing else in the project imports `huggingface_hub` for network I/O: the checkpoint store, `eval` and
`transcribe` go through `HubRepo`, and everything past it sees local paths.

Retries: 408/429/5xx answers, timeouts and dropped connections are retried with exponential backoff and
full jitter (tenacity); anything else (401, 404, a bad request) fails at once, since waiting cannot fix it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    get_session,
    hf_hub_download,
    hf_hub_url,
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
from huggingface_hub.utils import build_hf_headers, filter_repo_objects, hf_raise_for_status
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_when_event_set,
    wait_random_exponential,
)

from tiny_audio import progress, space
from tiny_audio.errors import UserError
from tiny_audio.redact import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# huggingface_hub's shared HTTP client waits forever by default: one stalled connection would hang the
# uploader for the rest of the run. Reads/writes are per network operation, so big files are not cut off.
HTTP_TIMEOUT = httpx2.Timeout(300.0, connect=30.0)


# --- tokens ---------------------------------------------------------------------------------------------


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


# --- retries --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one Hub call is retried: up to `attempts` tries, waits random in [0, initial_s * 2^n], <= max_s."""

    attempts: int = 6
    initial_s: float = 2.0
    max_s: float = 60.0


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
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "hub: %s on %s failed (%s); retry %d/%d in %.1f s",
                what,
                self.repo_id,
                describe(exc) if exc else "?",
                state.attempt_number,
                self.retry.attempts - 1,
                wait,
            )

        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            wait=wait_random_exponential(multiplier=self.retry.initial_s, max=self.retry.max_s),
            stop=stop_any(stop_after_attempt(self.retry.attempts), stop_when_event_set(self.cancel)),
            sleep=self.cancel.wait,  # a set cancel event cuts the wait short
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(fn)
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


# --- base models ----------------------------------------------------------------------------------------

# Weight formats a repo may hold beside safetensors: transformers reads safetensors, so the rest is not fetched.
_OTHER_WEIGHT_FORMATS = ["*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.gguf", "original/*", "onnx/*"]


def download_model(
    repo_id: str,
    *,
    revision: str | None,
    token: str | None,
    endpoint: str | None = None,
    retry: RetryPolicy | None = None,
    weights: bool = True,
) -> Path:
    """A base model's files in the HF cache (HF_HOME, downloaded once per volume); the snapshot's local path.

    Files already cached are not fetched again, and with HF_HUB_OFFLINE=1 a cached snapshot is used as is.
    weights=False: only the small files (configs, tokenizer, the safetensors index).
    A repo that does not exist, is gated or private, or is not cached while offline is a one-line UserError;
    so is a full or read-only HF_HOME. A download that lasts logs its progress every `progress.INTERVAL_S`.
    """
    repo = HubRepo(repo_id, token=token, revision=revision or "main", endpoint=endpoint, retry=retry or RetryPolicy())
    fix = "check model.encoder_id / model.decoder_id"
    ignore = _OTHER_WEIGHT_FORMATS + ([] if weights else ["*.safetensors"])
    missing = _uncached_files(repo, ignore_patterns=ignore) or {}
    total = sum(missing.values())
    cache = Path(hub_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    before = space.folder_bytes(cache)
    if total > 0:
        log.info(
            "download %s: %s in %d files into HF_HOME (%s)",
            repo_id,
            progress.format_bytes(total),
            len(missing),
            hub_constants.HF_HOME,
        )
    watch = progress.transfer(
        f"download {repo_id}", measure=lambda: space.folder_bytes(cache) - before, total=total, logger=log
    )
    try:
        with watch:
            path = Path(
                repo._call(
                    f"download of {repo_id}",
                    lambda: snapshot_download(
                        repo_id, revision=revision, ignore_patterns=ignore, endpoint=endpoint, token=token
                    ),
                    offline_hint="or point the model id at a local directory",
                )
            )
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN to a token of that account"
        ) from None
    except RepositoryNotFoundError:
        who = "with this HF_TOKEN" if token else "without HF_TOKEN"
        raise UserError(f"model {repo_id} does not exist or is private ({who}): {fix}") from None
    except LocalEntryNotFoundError as exc:
        if hub_constants.HF_HUB_OFFLINE:
            raise UserError(
                f"model {repo_id} is not in the local cache (HF_HOME) and HF_HUB_OFFLINE is set: unset "
                "HF_HUB_OFFLINE to download it once, or point the model id at a local directory"
            ) from None
        raise UserError(f"could not download {repo_id} from the Hub ({describe(exc.__cause__ or exc)})") from None
    except EntryNotFoundError:  # after LocalEntryNotFoundError, its subclass
        raise UserError(f"model {repo_id} has no revision {revision!r}: {fix} and its revision") from None
    except OSError as exc:
        raise _cache_error(exc, repo_id, needed=total) from None
    if watch.lines:
        log.info("download %s: done, %s", repo_id, progress.format_bytes(space.folder_bytes(cache) - before))
    return path


def model_size(repo_id: str, *, revision: str | None, token: str | None, endpoint: str | None = None) -> int | None:
    """Bytes `download_model` would fetch of `repo_id` now (files already cached left out), from the Hub's
    file listing; None when the Hub cannot be asked. Downloads nothing."""
    bound_http_timeouts()
    repo = HubRepo(repo_id, token=token, revision=revision or "main", endpoint=endpoint)
    missing = _uncached_files(repo, ignore_patterns=_OTHER_WEIGHT_FORMATS)
    return None if missing is None else sum(missing.values())


def _uncached_files(repo: HubRepo, *, ignore_patterns: list[str]) -> dict[str, int] | None:
    """{path: size} of the files a snapshot download of `repo` would fetch, from the Hub's file listing.

    A file whose blob is already in the cache is left out. None when the Hub cannot be asked (offline, an
    error): progress is then reported without a total, and the download itself says what went wrong.
    """
    if hub_constants.HF_HUB_OFFLINE:
        return None
    try:
        tree = list(repo.api.list_repo_tree(repo.repo_id, recursive=True, revision=repo.revision))
    except (HfHubHTTPError, httpx2.TransportError, OSError, ValueError):
        return None
    files = {entry.path: entry for entry in tree if isinstance(entry, RepoFile)}
    blobs = Path(hub_constants.HF_HUB_CACHE) / f"models--{repo.repo_id.replace('/', '--')}" / "blobs"
    wanted = filter_repo_objects(files, ignore_patterns=ignore_patterns)
    return {
        path: files[path].size
        for path in wanted
        if not (blobs / (files[path].lfs.sha256 if files[path].lfs else files[path].blob_id)).is_file()
    }


def _cache_error(exc: OSError, repo_id: str, *, needed: int) -> UserError:
    """The one line for a download into the HF cache that the disk refused: full, or not writable."""
    home = Path(hub_constants.HF_HOME)
    if space.is_disk_full(exc):
        return space.disk_full(
            folder=home,
            doing=f"downloading {repo_id} into the Hugging Face cache (HF_HOME)",
            need=f"the download needs ~{progress.format_bytes(needed)}" if needed else None,
            fix="free space on the volume, use a larger one, or point HF_HOME at a bigger disk",
        )
    if space.is_not_writable(exc):
        return UserError(
            f"cannot download {repo_id}: the Hugging Face cache HF_HOME={home} is not writable "
            f"({describe(exc)}); point HF_HOME at a writable folder"
        )
    raise exc


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


# --- part of a checkpoint -------------------------------------------------------------------------------

SAFETENSORS_INDEX = "model.safetensors.index.json"
_CHUNK = 8 << 20


def download_model_part(
    repo_id: str,
    *,
    prefixes: tuple[str, ...],
    revision: str | None,
    token: str | None,
    endpoint: str | None = None,
    retry: RetryPolicy | None = None,
) -> Path:
    """A local model folder holding a checkpoint's small files and ONLY the tensors named `prefixes*`.

    For a part of a larger model (GLM-ASR-Nano-2512's audio tower is ~1.3 GB of a ~4.5 GB file): the
    safetensors headers are read first, then only the byte ranges holding those tensors, with HTTP range
    requests (a broken transfer continues where it stopped), streamed straight into the new file behind its
    header, so the disk holds the part once. The result is a valid `model.safetensors` cached under HF_HOME
    per commit, so a volume downloads it once; its progress is logged every `progress.INTERVAL_S`.
    """
    retry = retry or RetryPolicy()
    snapshot = Path(
        download_model(repo_id, revision=revision, token=token, endpoint=endpoint, retry=retry, weights=False)
    )
    commit = snapshot.name  # snapshots/<commit sha>
    key = hashlib.sha256("\n".join(prefixes).encode()).hexdigest()[:12]
    folder = Path(hub_constants.HF_HOME) / "tiny-audio" / "parts" / repo_id.replace("/", "--") / f"{commit}-{key}"
    if (folder / "model.safetensors").is_file():
        return folder
    repo = HubRepo(repo_id, token=token, revision=commit, endpoint=endpoint, retry=retry)
    ranges = [_tensor_range(repo, filename, prefixes=prefixes) for filename in _part_files(snapshot, prefixes)]
    total = sum(r.stop - r.start for r in ranges)
    tmp = folder.with_name(folder.name + ".partial")
    target = tmp / "model.safetensors"
    label = f"download {repo_id} ({prefixes[0].rstrip('.')} tensors only)"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        base = _write_safetensors_header(target, parts=[(r.header, r.stop - r.start) for r in ranges])
        log.info("%s: %s into HF_HOME (%s)", label, progress.format_bytes(total), hub_constants.HF_HOME)
        watch = progress.transfer(label, measure=lambda: target.stat().st_size - base, total=total, logger=log)
        with watch:
            for r in ranges:
                _ranged_to_file(repo, r.url, r.start, r.stop, target)
        for item in snapshot.iterdir():
            if item.is_file() and item.name != SAFETENSORS_INDEX:
                shutil.copyfile(item, tmp / item.name)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # a part that does not fit is not kept half-written
        raise _cache_error(exc, repo_id, needed=total) from None
    for r in ranges:
        log.info("fetched %.1f MB of %s/%s (%d tensors)", (r.stop - r.start) / 1e6, repo_id, r.filename, len(r.header))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)  # complete or absent: a half-fetched part is never taken for a whole one
    return folder


def part_size(
    repo_id: str, *, prefixes: tuple[str, ...], revision: str | None, token: str | None, endpoint: str | None = None
) -> int | None:
    """Bytes `download_model_part` would fetch (the tensors' byte ranges and the small files), from the Hub's
    file listing and the safetensors headers only; None when the Hub cannot be asked. Downloads no weights."""
    if hub_constants.HF_HUB_OFFLINE:
        return None
    bound_http_timeouts()
    repo = HubRepo(repo_id, token=token, revision=revision or "main", endpoint=endpoint, retry=RetryPolicy(attempts=2))
    try:
        tree = list(repo.api.list_repo_tree(repo_id, recursive=True, revision=repo.revision))
        files = {entry.path: entry.size for entry in tree if isinstance(entry, RepoFile)}
        small = sum(size for name, size in files.items() if not name.endswith(".safetensors"))
        index = SAFETENSORS_INDEX in files
        if index:
            with tempfile.TemporaryDirectory(prefix="tiny-audio-index-") as scratch:
                found = repo.download_file(SAFETENSORS_INDEX, local_dir=Path(scratch))
                weight_map = json.loads(found.read_text())["weight_map"] if found else {}
            names = sorted({f for name, f in weight_map.items() if name.startswith(prefixes)})
        else:
            names = ["model.safetensors"]
        ranges = [_tensor_range(repo, name, prefixes=prefixes) for name in names]
    except (HfHubHTTPError, httpx2.TransportError, OSError, ValueError, KeyError, UserError):
        return None
    return small + sum(r.stop - r.start for r in ranges)


def _part_files(snapshot: Path, prefixes: tuple[str, ...]) -> list[str]:
    """The safetensors files of a snapshot that hold tensors named `prefixes*` (by its index when sharded)."""
    index = snapshot / SAFETENSORS_INDEX
    if not index.is_file():
        return ["model.safetensors"]
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    return sorted({f for name, f in weight_map.items() if name.startswith(prefixes)})


@dataclass(frozen=True)
class _Range:
    """Bytes [start, stop) of one Hub file holding the wanted tensors; `header` describes them from `start`."""

    filename: str
    url: str
    start: int
    stop: int
    header: dict[str, Any]


def _tensor_range(repo: HubRepo, filename: str, *, prefixes: tuple[str, ...]) -> _Range:
    """Read `filename`'s header and find the smallest byte range holding every tensor named `prefixes*`.

    The range's header entries hold the tensors inside it (offsets relative to its start). Tensors of other
    names that lie inside the range come along, since a safetensors buffer may hold no gaps.
    """
    url = hf_hub_url(repo.repo_id, filename, revision=repo.revision, endpoint=repo.endpoint)
    size = struct.unpack("<Q", _ranged(repo, url, 0, 8))[0]
    header = json.loads(_ranged(repo, url, 8, 8 + size))
    header.pop("__metadata__", None)
    wanted = {name: info for name, info in header.items() if name.startswith(prefixes)}
    if not wanted:
        raise UserError(f"{repo.repo_id}/{filename} holds no tensor named {' or '.join(prefixes)}*")
    begin = min(info["data_offsets"][0] for info in wanted.values())
    end = max(info["data_offsets"][1] for info in wanted.values())
    inside = {
        name: {**info, "data_offsets": [info["data_offsets"][0] - begin, info["data_offsets"][1] - begin]}
        for name, info in header.items()
        if begin <= info["data_offsets"][0] and info["data_offsets"][1] <= end
    }
    return _Range(filename=filename, url=url, start=8 + size + begin, stop=8 + size + end, header=inside)


def _ranged(repo: HubRepo, url: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a Hub file."""

    def get() -> bytes:
        headers = build_hf_headers(token=repo.token) | {"Range": f"bytes={start}-{stop - 1}"}
        response = get_session().get(url, headers=headers, follow_redirects=True)
        hf_raise_for_status(response)
        return response.content[: stop - start]

    return repo._call(f"range read of {url.rsplit('/', 1)[-1]}", get)


def _ranged_to_file(repo: HubRepo, url: str, start: int, stop: int, path: Path) -> None:
    """Bytes [start, stop) of a Hub file appended to `path`; a retry continues from what already arrived."""
    base = path.stat().st_size

    def get() -> None:
        done = path.stat().st_size - base
        if start + done >= stop:
            return
        headers = build_hf_headers(token=repo.token) | {"Range": f"bytes={start + done}-{stop - 1}"}
        with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
            hf_raise_for_status(response)
            with path.open("ab") as out:
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
        if path.stat().st_size - base != stop - start:
            raise ConnectionError(f"transfer ended at {path.stat().st_size - base} of {stop - start} bytes")

    repo._call(f"download of {url.rsplit('/', 1)[-1]}", get)


def _write_safetensors_header(path: Path, *, parts: list[tuple[dict[str, Any], int]]) -> int:
    """Start a safetensors file whose data will be several (header entries, data size) parts one after another:
    write its header into `path` (replaced) and return the header's length, where the data starts."""
    entries: dict[str, Any] = {}
    shift = 0
    for part, data_size in parts:
        for name, info in part.items():
            lo, hi = info["data_offsets"]
            entries[name] = {**info, "data_offsets": [lo + shift, hi + shift]}
        shift += data_size
    entries["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(entries, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
    return 8 + len(encoded)
