"""One way to retry a call that may fail for a while: a policy, and a function that runs a call under it.

Waits grow exponentially with full jitter: before retry n the wait is random in [0, min(max_s, initial_s * 2^(n-1))],
so callers that failed together do not retry together. When the server says how long to wait (an HTTP
`Retry-After`), that wait is used instead, capped at `max_s`. Only errors the caller's `is_transient` accepts
are retried; anything else is raised at once, since waiting cannot fix it. A set `cancel` event ends the
retries at once (shutdown), waits included.

The loop itself is tenacity's; this module fixes the policy's shape and the log line, so every caller (RunPod's
API here; the Hub client and the data sources can move onto it) retries and reports the same way.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_any, stop_when_event_set

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one call is tried: up to `attempts` tries, waits random in [0, initial_s * 2^n], at most max_s."""

    attempts: int = 6
    initial_s: float = 2.0
    max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_s < 0 or self.max_s < 0:
            raise ValueError(f"a retry policy needs attempts >= 1 and waits >= 0, got {self}")


def backoff_s(policy: RetryPolicy, retry: int, *, rng: random.Random | None = None) -> float:
    """The wait before retry number `retry` (1 = the first retry): full jitter over an exponential window."""
    window = min(policy.max_s, policy.initial_s * 2 ** (retry - 1))
    return (rng or random).uniform(0.0, window)


def describe(error: BaseException) -> str:
    """One line for a log: the error's class and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def retry_call(
    call: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    cancel: threading.Event | None = None,
    server_wait_s: Callable[[BaseException], float | None] | None = None,
    describe_error: Callable[[BaseException], str] = describe,
    logger: logging.Logger | None = None,
) -> T:
    """`call()`, tried again after errors `is_transient` accepts; the last error is raised when the tries run out.

    Before each wait one warning goes to `logger`: `<what> failed (<error>); retry 1/4 in 1.3 s`.
    `server_wait_s(error)`, when given, returns the wait the server asked for (or None to use the backoff).
    """
    logger = logger or log
    cancel = cancel or threading.Event()

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        asked = server_wait_s(error) if server_wait_s and error is not None else None
        if asked is not None:
            return min(max(asked, 0.0), policy.max_s)
        return backoff_s(policy, state.attempt_number)

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        seconds = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "%s failed (%s); retry %d/%d in %.1f s",
            what,
            describe_error(error) if error is not None else "?",
            state.attempt_number,
            policy.attempts - 1,
            seconds,
        )

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait,
        stop=stop_any(stop_after_attempt(policy.attempts), stop_when_event_set(cancel)),
        sleep=cancel.wait,  # a set cancel event cuts the wait short
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(call)


def retry_after_s(value: str | None) -> float | None:
    """An HTTP Retry-After header (seconds, or a date) as seconds from now; None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
