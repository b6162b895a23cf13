"""A local stand-in for RunPod's REST API v2 (https://api.runpod.io/v2), for the tests of tiny_audio.runpod_api.

It answers what the container calls, as the v2 reference describes it (docs.runpod.io/api-reference-v2: the
migration guide, "Trigger a pod state transition", "Get a pod", "Terminate a pod", and the OpenAPI schema):

  GET    /v2/pods/{id}          200 the pod (its `cost` is USD per hour)
  POST   /v2/pods/{id}/action   body {"action": "start" | "stop" | "restart" | "terminate"}, nothing else:
                                200 the updated pod (204 for terminate); 409 when the pod's status does not
                                allow the action; 422 for a body that breaks the schema (unknown fields too)
  DELETE /v2/pods/{id}          204

Every error is an RFC 9457 problem (`application/problem+json`: title, status, detail, errors). A missing or
unknown bearer key is 401, an unknown pod 404, and every other path 404, v1's (`/v1/...`, `/pods/{id}/stop`)
included: code still calling v1 fails here as it does against RunPod now. Queued failures (429 with Retry-After,
5xx) are answered first, one per request, to exercise the retries.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ACTIONS = ("start", "stop", "restart", "terminate")
# Which transitions a pod's status allows (the `actions` field of a v2 pod).
ALLOWED = {
    "RUNNING": ["stop", "restart", "terminate"],
    "EXITED": ["start", "terminate"],
    "PROVISIONING": ["stop", "terminate"],
}
_REASONS = {401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 415: "Unsupported"}
_REASONS |= {422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error"}
_REASONS |= {502: "Bad Gateway", 503: "Service Unavailable"}


def pod(pod_id: str, *, cost: float = 0.44, status: str = "RUNNING") -> dict[str, Any]:
    """A v2 Pod resource with the fields the container reads, and a few it does not."""
    return {
        "id": pod_id,
        "name": "tiny-audio",
        "image": "ghcr.io/tiny-audio/tiny-audio:latest",
        "status": status,
        "actions": list(ALLOWED[status]),
        "gpu": {"id": "NVIDIA A40", "count": 1},
        "cloud": "SECURE",
        "cost": cost,
        "runtime": {"uptime": 60},
    }


@dataclass
class Call:
    method: str
    path: str
    authorization: str
    body: Any = None  # the decoded JSON body, or the raw text when it is not JSON


@dataclass
class RunPodV2:
    """The stand-in's state: its URL (ending in /v2), valid keys, pods, recorded calls and queued failures."""

    url: str = ""
    keys: set[str] = field(default_factory=lambda: {"rp_key"})
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # (status, headers), answered first

    def add_pod(self, pod_id: str, **fields: Any) -> dict[str, Any]:
        self.pods[pod_id] = pod(pod_id, **fields)
        return self.pods[pod_id]

    def fail(self, *statuses: int, retry_after: str | None = None) -> None:
        for status in statuses:
            self.failures.append((status, {"Retry-After": retry_after} if retry_after is not None else {}))


def _problem(status: int, detail: str, errors: list[str] | None = None) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"title": _REASONS.get(status, "Error"), "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return status, body


def _validate_action(body: Any) -> list[str]:
    """The schema PodActionRequest: an object, `action` required, one of ACTIONS, no other property."""
    if not isinstance(body, dict):
        return ["$: expected object"]
    errors = []
    extra = sorted(set(body) - {"action"})
    if "action" not in body:
        errors.append("$: missing property 'action'")
    elif body["action"] not in ACTIONS:
        errors.append(f"$.action: value must be one of {', '.join(repr(a) for a in ACTIONS)}")
    if extra:
        errors.append(f"$: additional properties {', '.join(repr(x) for x in extra)} not allowed")
    return errors


def _answer(state: RunPodV2, method: str, path: str, authorization: str, body: Any) -> tuple[int, Any]:
    if not authorization.startswith("Bearer ") or not authorization.removeprefix("Bearer "):
        return _problem(401, "missing bearer token")
    if authorization.removeprefix("Bearer ") not in state.keys:
        return _problem(401, "invalid bearer token")
    action_route = re.fullmatch(r"/v2/pods/([^/]+)/action", path)
    pod_route = re.fullmatch(r"/v2/pods/([^/]+)", path)
    if action_route:
        if method != "POST":
            return _problem(405, "The requested method is not allowed for this path.")
        pod_id = action_route.group(1)
        if isinstance(body, str):
            return _problem(415, "request body must be application/json")
        errors = _validate_action(body)
        if errors:
            return _problem(422, "Request validation failed.", errors)
        found = state.pods.get(pod_id)
        if found is None:
            return _problem(404, "pod not found")
        action = body["action"]
        if action not in found["actions"]:
            return _problem(409, f"cannot {action} a pod that is {found['status']}")
        if action == "terminate":
            del state.pods[pod_id]
            return 204, None
        status = "EXITED" if action == "stop" else "RUNNING"
        found.update(status=status, actions=list(ALLOWED[status]), cost=found["cost"] if status == "RUNNING" else 0.0)
        return 200, found
    if pod_route:
        pod_id = pod_route.group(1)
        if method not in ("GET", "DELETE"):
            return _problem(405, "The requested method is not allowed for this path.")
        if pod_id not in state.pods:
            return _problem(404, "pod not found")
        if method == "DELETE":
            del state.pods[pod_id]
            return 204, None
        return 200, state.pods[pod_id]
    return _problem(404, f"no route {method} {path}")


@contextmanager
def serve_runpod_v2() -> Iterator[RunPodV2]:
    """A running stand-in on 127.0.0.1 (a free port); `state.url` is its v2 base URL."""
    state = RunPodV2()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            body: Any = raw or None
            if raw and (self.headers.get("Content-Type") or "").startswith("application/json"):
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = raw
            authorization = self.headers.get("Authorization", "")
            state.calls.append(Call(self.command, self.path, authorization, body))
            headers: dict[str, str] = {}
            if state.failures:
                status, headers = state.failures.pop(0)
                status, answer = _problem(status, "injected failure")
            else:
                status, answer = _answer(state, self.command, self.path, authorization, body)
            payload = b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            kind = "application/json" if status < 400 else "application/problem+json"
            for name, value in {"Content-Type": kind, "Content-Length": str(len(payload)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = do_PATCH = _handle

        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v2"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
