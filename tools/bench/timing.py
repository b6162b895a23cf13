"""Timing and peak memory for the benchmarks: phase timers that synchronise the GPU, and a peak-RSS watcher."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("data", "features", "encoder", "projector", "decoder_fwd", "decoder_bwd", "optimizer")


# -- timing --------------------------------------------------------------------------------------------------------
class Timer:
    """Wall time per phase; on a GPU each boundary waits for queued kernels, so a phase owns its own work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self._last = 0.0

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sync point: GPU time goes to the phase that queued the work
        return time.perf_counter()

    def start(self) -> None:
        self._last = self.now()

    def lap(self, phase: str) -> None:
        now = self.now()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._last
        self._last = now


class PeakMemory:
    """Peak memory while a block runs: the CUDA allocator's peak, or on CPU the resident set sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's lifetime peak is the best there is
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @contextmanager
    def watch(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        stop = threading.Event()
        self.peak = self.rss()

        def sample() -> None:
            while not stop.wait(0.005):
                self.peak = max(self.peak, self.rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, self.rss())


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next projector's resident set starts from what is used."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as the trainer's bf16 mixed precision
            yield
    else:
        yield
