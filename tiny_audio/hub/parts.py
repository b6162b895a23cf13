"""Part of a checkpoint from the Hub: only the tensors named by some prefixes (GLM-ASR-Nano-2512's audio tower is
~1.3 GB of a ~4.5 GB file), read with HTTP range requests after the safetensors header, written as a valid
`model.safetensors` cached under HF_HOME per commit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import (
    RepoFile,
    get_session,
    hf_hub_url,
)
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    HfHubHTTPError,
)
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

from tiny_audio import progress
from tiny_audio.errors import UserError
from tiny_audio.hub.models import _cache_error, download_model
from tiny_audio.hub.repo import HubRepo, bound_http_timeouts
from tiny_audio.retry import RetryPolicy

log = logging.getLogger(__name__)


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
