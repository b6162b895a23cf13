"""A small in-memory server speaking the parts of the Hugging Face Hub protocol this project uses.

It lets the REAL `huggingface_hub` client (create_repo, upload_folder, list_repo_tree, file_exists,
snapshot_download, hf_hub_download) and `datasets` (load_dataset streaming through HfFileSystem) run in tests
without the network, on 127.0.0.1 only. Uploads are committed inline ("regular" upload mode), held in memory;
with `lfs_storage` files of LFS_THRESHOLD bytes or more go through LFS instead (the client's basic transfer:
batch, PUT, verify) and are kept on disk. Xet transfers are not spoken (set HF_HUB_DISABLE_XET=1 for LFS uploads).

Model and dataset repos: `publish(repo_id, folder, repo_type=...)` serves a local folder as a repo's one commit,
read from disk. Its large files (safetensors, parquet, over `LFS_THRESHOLD`) are served as the Hub serves LFS
files: listed with their `lfs` sha256 and size, and `resolve` answers 302 to a second listener on another port
(the "CDN", another origin, so the client drops its Authorization header as it does off the Hub), which serves
the bytes, ranges included. `transfers` records every response that carried file bytes.

Faults can be injected per request (`server.inject(...)`): an HTTP status (429, 500, ...), a dropped
connection (the socket closes before any response), a delay, or a trickle (the body sent in 16 kB pieces,
`delay_s` apart: a slow download), matched on "METHOD /path" substrings.

Endpoints answered ({kind} is `models` or `datasets`; {prefix} is empty for models, `datasets/` for datasets):
    POST /api/repos/create                               create a model repo (409 if it exists)
    POST /api/validate-yaml                              README metadata check (always valid)
    GET  /api/{kind}/{repo}[/revision/{rev}]             repo info: sha + siblings
    GET  /api/{kind}/{repo}/tree/{rev}[/{path}]          tree listing (recursive or not)
    POST /api/models/{repo}/preupload/{rev}              upload modes: "regular", or "lfs" for large files
    POST /api/models/{repo}/commit/{rev}                 NDJSON commit: file, lfsFile, deletedFile, deletedFolder
    HEAD/GET /{prefix}{repo}/resolve/{rev}/{path}        file metadata / content (GET: a `Range: bytes=a-b` too);
                                                         302 to the CDN listener for an LFS file
    POST /{prefix}{repo}.git/info/lfs/objects/batch      LFS upload actions (with `lfs_storage` only)
    POST /{prefix}{repo}.git/info/lfs/objects/verify     whether an LFS object arrived
    HEAD/GET <cdn>/blobs/{sha256}                        an LFS file's bytes (ranges too)
    PUT  <cdn>/upload/{type}/{repo}/{sha256}             an LFS object's bytes, kept in `lfs_storage`
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TRICKLE_BYTES = 16_000


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


LFS_THRESHOLD = 10 << 20
"""A published file at least this large (or any safetensors/parquet file) is served as an LFS file."""
_LFS_SUFFIXES = (".safetensors", ".parquet")
_COPY_CHUNK = 1 << 20


class Blob:
    """A file kept on disk (published, or uploaded through LFS), read when asked; its hashes are computed once.

    sha256: an LFS upload's, already checked while it was received (the file is then not read again).
    """

    def __init__(self, path: Path, *, sha256: str | None = None) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.lfs = sha256 is not None or self.size >= LFS_THRESHOLD or path.suffix in _LFS_SUFFIXES
        if sha256 is None:
            sha1, digest = hashlib.sha1(b"blob %d\0" % self.size), hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(_COPY_CHUNK):
                    sha1.update(chunk)
                    digest.update(chunk)
            sha256 = digest.hexdigest()
        self.sha256 = sha256
        # an LFS file's git blob is its pointer file; a regular file's is its content
        self.oid = git_blob_oid(self.pointer()) if self.lfs else sha1.hexdigest()

    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    def chunks(self, start: int, stop: int) -> Iterator[bytes]:
        with self.path.open("rb") as f:
            f.seek(start)
            left = stop - start
            while left > 0 and (chunk := f.read(min(_COPY_CHUNK, left))):
                left -= len(chunk)
                yield chunk


FileData = bytes | Blob


def _size(data: FileData) -> int:
    return data.size if isinstance(data, Blob) else len(data)


def _oid(data: FileData) -> str:
    return data.oid if isinstance(data, Blob) else git_blob_oid(data)


@dataclass(frozen=True)
class Transfer:
    """One response that carried file bytes: [start, stop) of `path` in a repo (`full`: no Range asked).

    A file uploaded through LFS is named by its object, `lfs/<sha256>` (the same bytes may sit at several paths).
    """

    repo_type: str
    repo_id: str
    path: str
    start: int
    stop: int
    full: bool

    @property
    def bytes(self) -> int:
        return self.stop - self.start


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, FileData]


@dataclass
class Repo:
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def files(self) -> dict[str, FileData]:
        return self.commits[-1].files if self.commits else {}

    def at(self, revision: str) -> Commit | None:
        """The commit a revision names: `main` (the head) or a commit oid."""
        if revision == "main":
            return self.commits[-1] if self.commits else Commit(oid="0" * 40, message="", files={})
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class Fault:
    """Answer requests whose "METHOD /path" contains `match` with `status`, a dropped connection or a delay."""

    match: str
    kind: str  # "status" | "drop" | "delay" | "trickle"
    status: int = 500
    delay_s: float = 0.0
    times: int | None = 1  # None: forever
    hits: int = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (timeout, flush deadline) closes its socket mid-answer: expected, not news."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HubServer:
    """In-memory Hub on 127.0.0.1 (random port). Use as a context manager; `endpoint` is the base URL."""

    def __init__(self, *, token: str | None = None, lfs_storage: Path | None = None) -> None:
        """lfs_storage: a folder for files uploaded through LFS. Given, the server asks for LFS uploads of files
        of LFS_THRESHOLD bytes or more (as the Hub does), which the client then streams instead of inlining them
        base64-encoded in the commit; without it every upload is "regular", held in memory."""
        self.token = token
        self.lfs_storage = lfs_storage
        self.repos: dict[str, Repo] = {}  # model repos
        self.datasets: dict[str, Repo] = {}  # dataset repos
        self.requests: list[str] = []
        self.faults: list[Fault] = []
        self.transfers: list[Transfer] = []
        self.lfs_blobs: dict[str, tuple[str, str, str, Blob]] = {}  # sha256 -> (repo type, repo id, path, blob)
        self.lock = threading.Lock()
        self.bytes_served = 0  # by range requests
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        self._cdn = _Server(("127.0.0.1", 0), _make_cdn_handler(self))
        self._threads = [
            threading.Thread(target=server.serve_forever, name=name, daemon=True)
            for name, server in (("hub-server", self._httpd), ("hub-cdn", self._cdn))
        ]

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_endpoint(self) -> str:
        host, port = self._cdn.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self._httpd, self._cdn):
            server.shutdown()
            server.server_close()

    def publish(self, repo_id: str, folder: Path, *, repo_type: str = "model", private: bool = False) -> Commit:
        """Serve every file under `folder` (dot-folders left out) as repo `repo_id`'s one commit, read from disk."""
        files: dict[str, FileData] = {}
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts[:-1]):
                files[relative.as_posix()] = Blob(path)
        oid = hashlib.sha1(f"{repo_type}:{repo_id}:{time.time_ns()}".encode()).hexdigest()
        commit = Commit(oid=oid, message="published", files=files)
        with self.lock:
            self.kind(repo_type)[repo_id] = Repo(private=private, commits=[commit])
            for path, blob in files.items():
                if isinstance(blob, Blob) and blob.lfs:
                    self.lfs_blobs[blob.sha256] = (repo_type, repo_id, path, blob)
        return commit

    def kind(self, repo_type: str) -> dict[str, Repo]:
        """The repos of one type: "model" or "dataset"."""
        return {"model": self.repos, "dataset": self.datasets}[repo_type]

    def transfers_of(self, repo_id: str, *, repo_type: str = "model") -> list[Transfer]:
        with self.lock:
            return [t for t in self.transfers if t.repo_id == repo_id and t.repo_type == repo_type]

    def _record(self, transfer: Transfer) -> None:
        with self.lock:
            self.transfers.append(transfer)
            if not transfer.full:
                self.bytes_served += transfer.bytes

    def inject(
        self, match: str, *, kind: str = "status", status: int = 500, delay_s: float = 0.0, times: int | None = 1
    ) -> Fault:
        """Fail the next `times` requests whose "METHOD /path" contains `match` (times=None: all of them)."""
        fault = Fault(match=match, kind=kind, status=status, delay_s=delay_s, times=times)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits) if repo_id in self.repos else []

    def _take_fault(self, line: str) -> Fault | None:
        with self.lock:
            self.requests.append(line)
            for fault in self.faults:
                if fault.match in line and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    fault.hits += 1
                    return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    """Plumbing shared by the Hub and CDN listeners."""

    protocol_version = "HTTP/1.0"  # one request per connection: a dropped connection stays simple
    server_state: HubServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log."""

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, payload: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> None:
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self._write(data)

    def _write(self, data: bytes) -> None:
        """The body, at once, or in TRICKLE_BYTES pieces `trickle_s` apart when a trickle fault asks for it."""
        pause = getattr(self, "trickle_s", 0.0)
        piece = TRICKLE_BYTES if pause else max(len(data), 1)
        for start in range(0, len(data), piece):
            if start:
                time.sleep(pause)
            self.wfile.write(data[start : start + piece])
            self.wfile.flush()

    def _error(self, status: int, code: str | None = None, message: str = "") -> None:
        headers = {"X-Error-Code": code} if code else {}
        if message:
            headers["X-Error-Message"] = message
        self._send(status, {"error": message or HTTPStatus(status).phrase}, headers=headers)

    def _send_file(self, data: FileData, headers: dict[str, str], *, where: tuple[str, str, str]) -> None:
        """A file's bytes, or the range the request asks for (206); the transfer is recorded."""
        size = _size(data)
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start, stop, status = 0, size, 200
        if wanted is not None:
            start = int(wanted[1])
            stop = min(int(wanted[2]) + 1 if wanted[2] else size, size)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{stop - 1}/{size}"}
        if not isinstance(data, Blob):
            if self.command == "GET":
                self.server_state._record(Transfer(*where, start, stop, full=wanted is None))
            return self._send(status, raw=data[start:stop], headers=headers)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return None
        for chunk in data.chunks(start, stop):
            self._write(chunk)
        self.server_state._record(Transfer(*where, start, stop, full=wanted is None))
        return None


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_state = server

        def _authorized(self) -> bool:
            if server.token is None:
                return True
            return self.headers.get("Authorization") == f"Bearer {server.token}"

        def _dispatch(self) -> None:
            body = self._body() if self.command in ("POST", "PUT") else b""
            url = urlsplit(self.path)
            line = f"{self.command} {url.path}"
            fault = server._take_fault(line)
            if fault is not None:
                if fault.kind == "drop":
                    self.close_connection = True
                    return  # no status line at all: the client sees a dropped connection
                if fault.kind == "delay":
                    time.sleep(fault.delay_s)
                elif fault.kind == "trickle":
                    self.trickle_s = fault.delay_s
                else:
                    self._error(fault.status, message=f"injected {fault.status}")
                    return
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = [unquote(p) for p in url.path.split("/")[1:]]
            try:
                self._route(parts, query, body)
            except KeyError as exc:
                self._error(404, "EntryNotFound", f"not found: {exc}")

        do_GET = do_POST = do_HEAD = _dispatch

        # -- routes -----------------------------------------------------------------------------------
        def _route(self, parts: list[str], query: dict[str, str], body: bytes) -> None:
            if parts[:3] == ["api", "repos", "create"] and self.command == "POST":
                return self._create(json.loads(body))
            if parts[:2] == ["api", "validate-yaml"]:
                return self._send(200, {"errors": [], "warnings": []})
            if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                repo_type = parts[1][:-1]
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                repo = self._repo(repo_type, repo_id)
                if repo is None:
                    return None
                if not rest or rest[0] == "revision":
                    return self._info(repo_id, repo, rest[1] if len(rest) > 1 else "main")
                if rest[0] == "tree" and len(rest) >= 2:
                    return self._tree(repo, rest[1], "/".join(rest[2:]), query.get("recursive") in ("True", "true"))
                if rest[0] == "preupload" and self.command == "POST":
                    return self._preupload(repo, json.loads(body))
                if rest[0] == "commit" and self.command == "POST":
                    return self._commit(repo_id, repo, body)
            repo_type, where = ("dataset", parts[1:]) if parts[:1] == ["datasets"] else ("model", parts)
            if len(where) >= 4 and where[1].endswith(".git") and where[2:4] == ["info", "lfs"] and body:
                repo_id = f"{where[0]}/{where[1].removesuffix('.git')}"
                if self._repo(repo_type, repo_id) is None:
                    return None
                if not self._authorized():
                    return self._error(401, message="Invalid credentials in Authorization header")
                if where[4:] == ["objects", "batch"]:
                    return self._lfs_batch(repo_type, repo_id, json.loads(body))
                if where[4:] == ["objects", "verify"]:
                    oid = json.loads(body)["oid"]
                    return self._send(200 if oid in server.lfs_blobs else 404, {})
            if len(where) >= 5 and where[2] == "resolve":
                repo_id = f"{where[0]}/{where[1]}"
                repo = self._repo(repo_type, repo_id)
                if repo is None:
                    return None
                return self._resolve(repo_type, repo_id, repo, where[3], "/".join(where[4:]))
            return self._error(404, message=f"no route for {self.command} {self.path}")

        def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
            repo = server.kind(repo_type).get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                self._error(404 if repo is None else 401, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _create(self, payload: dict[str, Any]) -> None:
            if not self._authorized():
                return self._error(401, message="Invalid credentials in Authorization header")
            repo_id = f"{payload['organization']}/{payload['name']}"
            with server.lock:
                if repo_id in server.repos:
                    # the Hub's 409 body carries the url too: create_repo(exist_ok=True) reads it
                    body = {"error": "You already created this model repo", "url": f"{server.endpoint}/{repo_id}"}
                    return self._send(409, body)
                server.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            return self._send(200, {"url": f"{server.endpoint}/{repo_id}"})

        def _info(self, repo_id: str, repo: Repo, revision: str) -> None:
            commit = repo.at(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            siblings = [{"rfilename": path} for path in sorted(commit.files)]
            return self._send(200, {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings})

        def _entry(self, path: str, data: FileData) -> dict[str, Any]:
            entry: dict[str, Any] = {"type": "file", "oid": _oid(data), "size": _size(data), "path": path}
            if isinstance(data, Blob) and data.lfs:
                entry["lfs"] = {"oid": data.sha256, "size": data.size, "pointerSize": len(data.pointer())}
            return entry

        def _tree(self, repo: Repo, revision: str, prefix: str, recursive: bool) -> None:
            commit = repo.at(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            base = f"{prefix.rstrip('/')}/" if prefix else ""
            entries: dict[str, dict[str, Any]] = {}
            for path, data in sorted(commit.files.items()):
                if not path.startswith(base):
                    continue
                rest = path[len(base) :].split("/")
                # folders on the way down are listed as folders; without recursion only the first level is listed
                depth = len(rest) if recursive else 1
                for i in range(1, min(depth, len(rest) - 1) + 1):
                    folder = base + "/".join(rest[:i])
                    entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "path": folder})
                if recursive or len(rest) == 1:
                    entries[path] = self._entry(path, data)
            if prefix and not entries:
                return self._error(404, "EntryNotFound", f"{prefix} does not exist")
            return self._send(200, list(entries.values()))

        def _preupload(self, repo: Repo, payload: dict[str, Any]) -> None:
            files = []
            for item in payload["files"]:
                existing = repo.files.get(item["path"])
                oid = _oid(existing) if existing is not None else None
                lfs = server.lfs_storage is not None and item.get("size", 0) >= LFS_THRESHOLD
                mode = "lfs" if lfs else "regular"
                files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return self._send(200, {"files": files, "commitOid": repo.commits[-1].oid if repo.commits else None})

        def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
            if not self._authorized():
                return self._error(401, message="Invalid credentials in Authorization header")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            with server.lock:
                files = dict(repo.files)
                for item in lines:
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        stored = server.lfs_blobs.get(value["oid"])
                        if stored is None:
                            return self._error(400, message=f"LFS object {value['oid']} was not uploaded")
                        files[value["path"]] = stored[3]
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    elif item["key"] == "deletedFolder":
                        folder = value["path"].rstrip("/") + "/"
                        files = {p: d for p, d in files.items() if not p.startswith(folder)}
                    elif item["key"] != "header":
                        return self._error(400, message=f"unsupported commit operation {item['key']}")
                oid = hashlib.sha1(f"{repo_id}:{len(repo.commits)}:{time.time_ns()}".encode()).hexdigest()
                repo.commits.append(Commit(oid=oid, message=header["summary"], files=files))
            url = f"{server.endpoint}/{repo_id}/commit/{oid}"
            return self._send(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

        def _lfs_batch(self, repo_type: str, repo_id: str, payload: dict[str, Any]) -> None:
            """Where to PUT each object (the CDN listener), or no action for an object already stored."""
            prefix = "datasets/" if repo_type == "dataset" else ""
            objects = []
            for item in payload["objects"]:
                entry: dict[str, Any] = {"oid": item["oid"], "size": item["size"], "authenticated": True}
                if item["oid"] not in server.lfs_blobs:
                    verify = f"{server.endpoint}/{prefix}{repo_id}.git/info/lfs/objects/verify"
                    entry["actions"] = {
                        "upload": {"href": f"{server.cdn_endpoint}/upload/{repo_type}/{repo_id}/{item['oid']}"},
                        "verify": {"href": verify},
                    }
                objects.append(entry)
            return self._send(200, {"transfer": "basic", "objects": objects})

        def _resolve(self, repo_type: str, repo_id: str, repo: Repo, revision: str, path: str) -> None:
            commit = repo.at(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            if path not in commit.files:
                return self._error(404, "EntryNotFound", f"{path} does not exist")
            data = commit.files[path]
            headers = {"ETag": f'"{_oid(data)}"', "X-Repo-Commit": commit.oid}
            if isinstance(data, Blob) and data.lfs:
                # as the Hub does for LFS files: the metadata here, the bytes at a signed URL on another host
                headers |= {
                    "X-Linked-Etag": f'"{data.sha256}"',
                    "X-Linked-Size": str(data.size),
                    "Location": f"{server.cdn_endpoint}/blobs/{data.sha256}?expires={int(time.time()) + 3600}",
                }
                return self._send(302, raw=b"", headers=headers)
            return self._send_file(data, headers, where=(repo_type, repo_id, path))

    return Handler


def _make_cdn_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class CdnHandler(_Handler):
        server_state = server

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            parts = url.path.split("/")[1:]
            with server.lock:
                server.requests.append(f"{self.command} cdn:{url.path}")
            if self.command == "PUT" and len(parts) == 5 and parts[0] == "upload" and server.lfs_storage is not None:
                return self._receive(repo_type=parts[1], repo_id=f"{parts[2]}/{parts[3]}", oid=parts[4])
            found = server.lfs_blobs.get(parts[1]) if len(parts) == 2 and parts[0] == "blobs" else None
            if found is None:
                return self._error(404, message=f"no blob at {url.path}")
            repo_type, repo_id, path, blob = found
            return self._send_file(blob, {"ETag": f'"{blob.sha256}"'}, where=(repo_type, repo_id, path))

        def _receive(self, *, repo_type: str, repo_id: str, oid: str) -> None:
            """An LFS object's bytes (Content-Length or chunked), streamed to disk and checked against its oid."""
            assert server.lfs_storage is not None
            server.lfs_storage.mkdir(parents=True, exist_ok=True)
            target = server.lfs_storage / oid
            partial = target.with_suffix(f".{threading.get_ident()}.partial")  # the same object may come twice
            digest = hashlib.sha256()
            with partial.open("wb") as out:
                for chunk in self._request_chunks():
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != oid:
                partial.unlink()
                return self._error(400, message="content does not match its sha256")
            partial.replace(target)
            with server.lock:
                server.lfs_blobs.setdefault(oid, (repo_type, repo_id, f"lfs/{oid}", Blob(target, sha256=oid)))
            return self._send(200, {})

        def _request_chunks(self) -> Iterator[bytes]:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    yield self.rfile.read(size)
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline().strip():  # trailers up to the empty line
                    pass
                return
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0 and (chunk := self.rfile.read(min(_COPY_CHUNK, left))):
                left -= len(chunk)
                yield chunk

        do_GET = do_HEAD = do_PUT = _dispatch

    return CdnHandler
