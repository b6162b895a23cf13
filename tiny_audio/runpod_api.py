"""RunPod's REST API v2 (https://api.runpod.io/v2): every call the container makes to RunPod.

  POST /pods/{id}/action  {"action": "stop" | "terminate"}   stop the pod (GPU billing ends, the volume stays),
                                                           or delete it
  GET  /pods/{id}                                          the pod; its `cost` is its price in USD per hour

Every call sends `Authorization: Bearer <key>` and is retried on 429 (as long as Retry-After says, capped), 5xx
and dropped connections (tiny_audio.retry). Errors come as RFC 9457 problems (`title`, `status`, `detail`,
`errors`), unknown body fields are rejected (422), and v1's paths (rest.runpod.io/v1) are retired: a failure for
good is a `RunPodError`, one line without the key. RUNPOD_API_URL lets tests point the calls at a local server.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Literal

from tiny_audio.errors import UserError
from tiny_audio.retry import RetryPolicy, describe, retry_after_s, retry_call

PodAction = Literal["stop", "terminate"]
DEFAULT_API_URL = "https://api.runpod.io/v2"
RETIRED_API_HOST = "rest.runpod.io"  # REST API v1, retired (docs.runpod.io/api-reference-v2/migrate-from-v1)
# A stop at the end of a run is worth some patience (an hour of GPU is at stake), not a stalled container.
API_RETRY = RetryPolicy(attempts=6, initial_s=2.0, max_s=30.0)
API_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)


class RunPodError(UserError):
    """A RunPod API call failed for good (bad key, unknown pod, or still failing after the retries)."""


def api_url_from_env(env: Mapping[str, str]) -> str:
    """RUNPOD_API_URL (default RunPod's REST API v2); the retired v1 API is a mistake named in one line."""
    url = (env.get("RUNPOD_API_URL") or DEFAULT_API_URL).rstrip("/")
    if RETIRED_API_HOST in url:
        raise UserError(
            f"RUNPOD_API_URL={url} is RunPod's REST API v1, which RunPod has retired: unset RUNPOD_API_URL "
            f"(the default is {DEFAULT_API_URL})"
        )
    return url


def pod_action(
    *,
    pod_id: str,
    action: PodAction,
    api_key: str,
    api_url: str = DEFAULT_API_URL,
    retry: RetryPolicy = API_RETRY,
    timeout_s: float = API_TIMEOUT_S,
) -> None:
    """`POST {api_url}/pods/{pod_id}/action {"action": ...}`: stop (compute billing ends, the volume stays) or
    terminate (the pod and its container disk are deleted)."""
    request(
        "POST",
        f"{api_url}/pods/{pod_id}/action",
        body={"action": action},
        api_key=api_key,
        retry=retry,
        timeout_s=timeout_s,
    )


def stop_pod(*, pod_id: str, api_key: str, api_url: str = DEFAULT_API_URL, retry: RetryPolicy = API_RETRY) -> None:
    """Stop the pod: GPU billing ends, the volume is kept (a small storage charge goes on)."""
    pod_action(pod_id=pod_id, action="stop", api_key=api_key, api_url=api_url, retry=retry)


def terminate_pod(*, pod_id: str, api_key: str, api_url: str = DEFAULT_API_URL, retry: RetryPolicy = API_RETRY) -> None:
    """Terminate the pod: it and its container disk are deleted (a network volume is only detached)."""
    pod_action(pod_id=pod_id, action="terminate", api_key=api_key, api_url=api_url, retry=retry)


def pod_price(*, pod_id: str, api_key: str, api_url: str = DEFAULT_API_URL, retry: RetryPolicy = API_RETRY) -> float:
    """The pod's price in USD per hour: the `cost` of `GET {api_url}/pods/{pod_id}`."""
    pod = request("GET", f"{api_url}/pods/{pod_id}", api_key=api_key, retry=retry)
    cost = pod.get("cost") if isinstance(pod, dict) else None
    if isinstance(cost, bool) or not isinstance(cost, int | float) or cost < 0:
        raise RunPodError(f"RunPod API GET {api_url}/pods/{pod_id} gave no price (cost: {cost!r})")
    return float(cost)


class _Transient(Exception):
    """A rate limit or server error, retried; carries the wait the server asked for."""

    def __init__(self, error: urllib.error.HTTPError, wait_s: float | None) -> None:
        super().__init__(f"HTTP {error.code} {error.reason}")
        self.error, self.wait_s = error, wait_s


def _is_transient(error: BaseException) -> bool:
    """Rate limits, server errors and dropped connections are worth retrying; other 4xx answers are not."""
    if isinstance(error, _Transient):
        return True
    if isinstance(error, urllib.error.HTTPError):
        return False
    return isinstance(error, urllib.error.URLError | TimeoutError | ConnectionError)


def problem_text(body: bytes) -> str:
    """An RFC 9457 problem (`title`, `status`, `detail`, `errors`) in one line; other bodies as they are."""
    text = body.decode("utf-8", "replace").strip()
    try:
        problem = json.loads(text)
    except json.JSONDecodeError:
        return " ".join(text.split())[:300]
    if not isinstance(problem, dict):
        return text[:300]
    detail = str(problem.get("detail") or problem.get("message") or "").strip()
    errors = problem.get("errors")
    if isinstance(errors, list) and errors:
        detail += f" ({'; '.join(str(e) for e in errors)})"
    return " ".join(detail.split())[:300]


_HINTS = {
    401: " (check RUNPOD_API_KEY)",
    403: " (RUNPOD_API_KEY may not manage this pod: use a key with write access to pods)",
    404: " (check RUNPOD_POD_ID and RUNPOD_API_URL)",
}


def request(
    method: str,
    url: str,
    *,
    api_key: str,
    body: dict[str, Any] | None = None,
    retry: RetryPolicy = API_RETRY,
    timeout_s: float = API_TIMEOUT_S,
) -> Any:
    """One call to RunPod's API with the bearer key, retried on 429, 5xx and dropped connections; the decoded
    JSON answer (None for an empty one). A failure for good is a `RunPodError` in one line without the key."""
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"

    def call() -> Any:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, data=data, method=method, headers=headers), timeout=timeout_s
            ) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            if error.code == 429 or error.code >= 500:
                raise _Transient(error, retry_after_s(error.headers.get("Retry-After"))) from None
            raise
        return json.loads(payload) if payload.strip() else None

    try:
        return retry_call(
            call,
            what=f"runpod: {method} {url}",
            policy=retry,
            logger=log,
            is_transient=_is_transient,
            server_wait_s=lambda e: e.wait_s if isinstance(e, _Transient) else None,
            describe_error=lambda e: str(e) if isinstance(e, _Transient) else describe(e),
        )
    except (urllib.error.HTTPError, _Transient) as failure:
        error = failure.error if isinstance(failure, _Transient) else failure
        detail = problem_text(error.read())
        tries = f" after {retry.attempts} attempts" if isinstance(failure, _Transient) else ""
        raise RunPodError(
            f"RunPod API {method} {url} answered {error.code} {error.reason}{tries}{_HINTS.get(error.code, '')}"
            + (f": {detail}" if detail else "")
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise RunPodError(f"RunPod API {method} {url} unreachable after {retry.attempts} attempts: {reason}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunPodError(f"RunPod API {method} {url} answered something that is not JSON: {error}") from None
