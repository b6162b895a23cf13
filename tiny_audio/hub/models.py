"""Base models from the Hub into the Hugging Face cache (HF_HOME), once per volume, with progress lines and one-line
errors for a missing, gated, offline-only or full-disk download; and how much a download would need."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx2
from huggingface_hub import (
    RepoFile,
    snapshot_download,
)
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from tiny_audio import progress, space
from tiny_audio.errors import UserError
from tiny_audio.hub.repo import HubRepo, bound_http_timeouts, describe
from tiny_audio.retry import RetryPolicy

log = logging.getLogger(__name__)


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
