"""Peak memory of one call: what the ``mem peak MB`` and ``mem growth MB`` columns count.

Per call (:class:`MemoryMeter`), after ``gc.collect()``:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  the peak of bytes held by tensors (the caching allocator's reserve is not
  counted). ``mem_peak_mb`` is that peak, ``mem_growth_mb`` the peak minus what
  was allocated before the call (the model, the prompts).
* CPU: the process's resident set size (RSS, ``/proc/self/statm``), read by a
  sampling thread every millisecond during the call (less often while the
  calling thread holds the GIL for long). ``mem_peak_mb`` is the highest RSS
  seen, ``mem_growth_mb`` that minus the RSS just before the call. Before the
  call, glibc's ``malloc_trim(0)`` hands the pages that earlier calls freed
  back to the OS: glibc otherwise keeps them, the next call reuses them without
  the RSS moving, and a method that allocates hundreds of MB reads 0 (it did).
  RSS counts every page the process touches (tensors, oneDNN scratch, Python
  objects), not torch's tensors alone; a page allocated but never written is
  not counted. Without glibc there is no ``malloc_trim`` and the growth is a
  lower bound; off Linux there is no statm, the meter reads the lifetime peak
  (``ru_maxrss``), which cannot be reset, and the growth is a lower bound too.

The sampler runs during every method's calls alike; it holds the GIL for one
short file read per sample.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import threading

import torch

SAMPLE_S = 0.001
MB = 2**20


class MemoryMeter:
    """Peak memory during a ``with`` block on ``device`` (see the module docstring for what is counted).

    Attributes, set on exit:
        peak: int bytes, the highest level seen (RSS on CPU, allocated on CUDA).
        growth: int bytes, ``peak`` minus the level just before the block.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak = 0
        self.growth = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
        self._base = self._max = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(SAMPLE_S):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss())
        self.growth = self.peak - self._base
        return False


def _rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak, which cannot be reset
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another libc, or not Linux)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
