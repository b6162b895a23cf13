"""tiny_audio.retry: one policy, full-jitter backoff, a transient-error predicate, a cancel event, one log line."""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest

from tiny_audio.retry import RetryPolicy, backoff_s, retry_call

NO_WAIT = RetryPolicy(attempts=4, initial_s=0.0, max_s=0.0)


class Flaky:
    """Fails with the given errors, one per call, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def transient(error: BaseException) -> bool:
    return isinstance(error, ConnectionError)


def test_transient_errors_are_retried_until_the_call_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    call = Flaky(ConnectionError("reset"), ConnectionError("reset again"))
    with caplog.at_level(logging.WARNING, logger="tiny_audio.retry"):
        assert retry_call(call, what="upload", policy=NO_WAIT, is_transient=transient) == "ok"
    assert call.calls == 3
    assert [r.getMessage() for r in caplog.records] == [
        "upload failed (ConnectionError: reset); retry 1/3 in 0.0 s",
        "upload failed (ConnectionError: reset again); retry 2/3 in 0.0 s",
    ]


def test_other_errors_are_raised_at_once() -> None:
    call = Flaky(ValueError("bad request"))
    with pytest.raises(ValueError, match="bad request"):
        retry_call(call, what="x", policy=NO_WAIT, is_transient=transient)
    assert call.calls == 1


def test_the_last_error_is_raised_when_the_attempts_run_out() -> None:
    call = Flaky(*(ConnectionError(f"try {n}") for n in range(1, 10)))
    with pytest.raises(ConnectionError, match="try 4"):
        retry_call(call, what="x", policy=NO_WAIT, is_transient=transient)
    assert call.calls == 4


def test_a_set_cancel_event_ends_the_retries_and_cuts_a_wait_short() -> None:
    cancel = threading.Event()
    slow = RetryPolicy(attempts=5, initial_s=30.0, max_s=30.0)
    threading.Timer(0.2, cancel.set).start()  # set while the first wait (up to 30 s) is under way
    call = Flaky(*(ConnectionError("down") for _ in range(5)))
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        retry_call(call, what="x", policy=slow, is_transient=transient, cancel=cancel)
    assert time.monotonic() - started < 5 and call.calls <= 2


def test_the_servers_wait_is_used_capped_at_max_s() -> None:
    policy = RetryPolicy(attempts=3, initial_s=0.0, max_s=0.3)
    call = Flaky(ConnectionError("429"), ConnectionError("429"))
    started = time.monotonic()
    retry_call(call, what="x", policy=policy, is_transient=transient, server_wait_s=lambda e: 0.2)
    assert 0.4 <= time.monotonic() - started < 2
    capped = Flaky(ConnectionError("429"))
    started = time.monotonic()
    retry_call(capped, what="x", policy=policy, is_transient=transient, server_wait_s=lambda e: 3600)
    assert time.monotonic() - started < 2


def test_backoff_is_full_jitter_over_a_doubling_window_capped_at_max_s() -> None:
    policy = RetryPolicy(attempts=10, initial_s=2.0, max_s=10.0)
    rng = random.Random(0)
    for retry, window in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (8, 10.0)]:
        waits = [backoff_s(policy, retry, rng=rng) for _ in range(200)]
        assert min(waits) >= 0 and max(waits) <= window
        assert max(waits) > 0.8 * window and min(waits) < 0.2 * window  # spread over the whole window


def test_a_policy_that_cannot_try_is_refused() -> None:
    with pytest.raises(ValueError, match="attempts >= 1"):
        RetryPolicy(attempts=0)
