"""The process's memory, stage by stage: its peak, and giving back what a finished stage freed.

The stages of a run share one process. Without help, a stage would inherit the heap of the one before it: glibc
keeps freed memory for reuse instead of returning it (2026-12-04, AMD Zen 4, bf16: after SFT, the DPO stage idled at
6.2 GB between its steps). :func:`release` hands that memory back between stages, and
:func:`reset_peak` / :func:`peak_gb` measure each stage's own peak, which the runner prints and stores in the
stage's manifest. On systems without ``/proc`` (macOS) or glibc the peak is the process's lifetime peak and
nothing is trimmed; the results are the same either way.

:func:`reuse_freed_memory` keeps glibc from mapping fresh pages for every large tensor: by default each allocation
over 32 MB (every chunk of the 262k-token LM head's logits and log-probabilities) is a new ``mmap``, whose pages
the kernel faults in and zeroes on first touch, and unmaps again when the tensor is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
import sys
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_gb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 2)
    except OSError:
        pass
    return None


def current_gb() -> float | None:
    """Resident memory (GB) now, or None where ``/proc`` is missing."""
    return _status_gb("VmRSS")


def peak_gb() -> float:
    """Peak resident memory (GB) since the last :func:`reset_peak`, or since the process started."""
    peak = _status_gb("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9, 2)


def reset_peak() -> bool:
    """Start measuring the peak afresh (Linux: writing 5 to ``clear_refs`` resets VmHWM); False if unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@functools.cache
def _malloc_trim() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)  # glibc only
    except OSError:
        return None


# mallopt parameters (glibc's malloc.h) and glibc's defaults for the two we change
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_KEEP = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}


@functools.cache
def _mallopt() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "mallopt", None) if name else None  # glibc only
    except OSError:
        return None


def reuse_freed_memory(enabled: bool = True) -> bool:
    """Serve large allocations from the heap and keep what is freed there for the next one (glibc), instead of a
    fresh ``mmap`` for every tensor over 32 MB; ``enabled=False`` restores glibc's defaults. Measured on
    gemma-3-270m's LM head (2026-12-05, AMD Zen 4, bf16; forward + backward of 1,024 positions in chunks of 128):
    2.57 instead of 4.11 ms a position, the run's system time 1.0 instead of 11.2 s. The heap then shrinks only
    when :func:`release` trims it (between stages); a stage's peak is unchanged, as freed pages count as resident
    either way until reused or trimmed. False where the C library has no ``mallopt`` (not glibc)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # no mmap for large blocks, and no automatic trimming of the heap's top (which would unmap it all the same)
    values = _KEEP if enabled else _DEFAULTS
    return all(bool(mallopt(param, value)) for param, value in values.items())


def release() -> None:
    """Collect garbage, then give freed heap memory back to the system (and CUDA's cached blocks)."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
