"""Progress of a long wait (a model download, the first data), as log lines every `INTERVAL_S` seconds.

Lines, not a redrawn bar: RunPod's Logs tab and `docker logs` are not terminals, so a bar's carriage returns
would arrive as thousands of lines or none. A waiting loop does not report itself: a `Ticker` thread asks a
callback for the current line, so a wait that makes no progress at all (a stalled read) is reported too.

    download Qwen/Qwen3-0.6B: 412 MB of 1.5 GB (27%), 41 MB/s, ~26 s left
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)

INTERVAL_S = 10.0
"""Seconds between two progress lines (module-level so tests can lower it)."""


def format_bytes(n: float) -> str:
    """`830 kB`, `412 MB`, `1.5 GB` (decimal units, as the Hub shows file sizes)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def format_seconds(seconds: float) -> str:
    """`26 s`, `4 min`, `1.2 h`."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


class Ticker:
    """Log `line(elapsed_s)` every `interval_s` (default `INTERVAL_S`) from a background thread while in use.

    `line` returns None to skip a tick. Nothing is logged for a wait shorter than one interval.
    """

    def __init__(
        self,
        line: Callable[[float], str | None],
        *,
        logger: logging.Logger = log,
        interval_s: float | None = None,
        name: str = "progress",
    ) -> None:
        self._line, self._logger, self._name = line, logger, name
        self._interval = INTERVAL_S if interval_s is None else interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.monotonic()
        self.lines = 0

    def start(self) -> Ticker:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Ticker:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                text = self._line(time.monotonic() - self.started)
            except OSError:  # a file measured for the line vanished (renamed into place): skip this tick
                continue
            if text:
                self.lines += 1
                self._logger.info(text)


def transfer(label: str, *, measure: Callable[[], int], total: int | None, logger: logging.Logger = log) -> Ticker:
    """A Ticker for bytes arriving: `measure()` is the bytes received so far, `total` the bytes expected.

    Rate and time left are taken over the whole transfer so far (a steady figure in a log read later).
    """

    def line(elapsed: float) -> str:
        done = measure()
        rate = done / elapsed if elapsed > 0 else 0.0
        if not total and not done:
            return f"{label}: waiting for the Hub ({format_seconds(elapsed)})"
        if not total:
            return f"{label}: {format_bytes(done)}, {format_bytes(rate)}/s"
        share = min(done / total, 1.0)
        left = f", ~{format_seconds((total - done) / rate)} left" if rate > 0 and done < total else ""
        return f"{label}: {format_bytes(done)} of {format_bytes(total)} ({share:.0%}), {format_bytes(rate)}/s{left}"

    return Ticker(line, logger=logger, name=f"progress {label}")
