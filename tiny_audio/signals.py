"""Graceful stop: the first SIGTERM/SIGINT asks the loop to finish its step, save and exit; a second exits now."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

EXIT_STOPPED = 143  # 128 + SIGTERM: a stop by signal, with a checkpoint saved at the current step


class StopSignal:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            print(f"second {signal.Signals(signum).name}: exiting now without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(
            f"{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
