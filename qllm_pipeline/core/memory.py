"""Peak resident memory of a stretch of code, sampled by a background thread.

`resource.ru_maxrss` is the peak of the whole process, so in a sweep (many runs in one process) every stage would
report the largest peak seen so far. Sampling the current RSS while a stage runs gives that stage's own peak.
"""
from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """`with PeakRSS() as peak: ...` then `peak.mib` is the largest RSS seen while the body ran."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.bytes = 0

    def _sample(self) -> None:
        self.bytes = max(self.bytes, self._process.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakRSS":
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def release_freed_memory() -> None:
    """Return memory freed by a finished run to the OS, so the next job of a sweep starts from a low RSS.

    glibc keeps freed heap pages mapped; malloc_trim(0) hands them back. A no-op where libc has no malloc_trim.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
