"""A small in-memory server speaking the parts of the Hugging Face Hub protocol this project uses.

It lets the REAL `huggingface_hub` client (create_repo, upload_folder, list_repo_tree, file_exists,
snapshot_download, hf_hub_download) run in tests without the network, on 127.0.0.1 only. Files are
committed inline ("regular" upload mode), so LFS/Xet transfers are not exercised.

Faults can be injected per request (`server.inject(...)`): an HTTP status (429, 500, ...), a dropped
connection (the socket closes before any response), a delay, or a trickle (the body sent in 16 kB pieces,
`delay_s` apart: a slow download), matched on "METHOD /path" substrings.

Endpoints answered:
    POST /api/repos/create                               create a repo (409 if it exists)
    POST /api/validate-yaml                              README metadata check (always valid)
    GET  /api/models/{repo}[/revision/{rev}]             repo info: sha + siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]          tree listing (recursive or not)
    POST /api/models/{repo}/preupload/{rev}              upload modes: always "regular"
    POST /api/models/{repo}/commit/{rev}                 NDJSON commit: file, deletedFile, deletedFolder
    HEAD/GET /{repo}/resolve/{rev}/{path}                file metadata / content (GET: a `Range: bytes=a-b` too)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TRICKLE_BYTES = 16_000


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def files(self) -> dict[str, bytes]:
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

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.bytes_served = 0  # by range requests
        self._httpd = _Server(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

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


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: a dropped connection stays simple

        def log_message(self, format: str, *args: Any) -> None:
            """Silence the default stderr access log."""

        # -- plumbing ---------------------------------------------------------------------------------
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
            if self.command == "HEAD":
                return
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
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                repo = self._repo(repo_id)
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
            if len(parts) >= 5 and parts[2] == "resolve":
                repo = self._repo(f"{parts[0]}/{parts[1]}")
                if repo is None:
                    return None
                return self._resolve(repo, parts[3], "/".join(parts[4:]))
            return self._error(404, message=f"no route for {self.command} {self.path}")

        def _repo(self, repo_id: str) -> Repo | None:
            repo = server.repos.get(repo_id)
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
                    entries[path] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
            if prefix and not entries:
                return self._error(404, "EntryNotFound", f"{prefix} does not exist")
            return self._send(200, list(entries.values()))

        def _preupload(self, repo: Repo, payload: dict[str, Any]) -> None:
            files = []
            for item in payload["files"]:
                existing = repo.files.get(item["path"])
                oid = git_blob_oid(existing) if existing is not None else None
                files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
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

        def _resolve(self, repo: Repo, revision: str, path: str) -> None:
            commit = repo.at(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            if path not in commit.files:
                return self._error(404, "EntryNotFound", f"{path} does not exist")
            data = commit.files[path]
            headers = {"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": commit.oid}
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if wanted is None:
                return self._send(200, raw=data, headers=headers)
            start = int(wanted[1])
            stop = min(int(wanted[2]) + 1 if wanted[2] else len(data), len(data))
            server.bytes_served += stop - start
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            return self._send(206, raw=data[start:stop], headers=headers)

    return Handler
