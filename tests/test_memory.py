"""Each stage's peak memory is its own, and a finished stage's freed memory goes back to the system."""

from __future__ import annotations

import sys

import pytest

from pipeline import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")


def _touch(size: int) -> bytearray:
    block = bytearray(size)
    block[::4096] = b"\1" * len(block[::4096])  # resident, not only reserved
    return block


def test_peak_is_measured_from_the_last_reset():
    assert memory.reset_peak()
    before = memory.peak_gb()
    block = _touch(300_000_000)
    assert memory.peak_gb() >= before + 0.25
    del block
    memory.release()
    assert memory.reset_peak()
    assert memory.peak_gb() < before + 0.25  # the 300 MB block is no longer in the peak


def test_release_returns_freed_heap_memory_to_the_system():
    def rss_gb() -> float:
        line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024 / 1e9

    assert memory.current_gb() == pytest.approx(rss_gb(), abs=0.05)
    memory.release()
    start = rss_gb()
    first = [_touch(64_000) for _ in range(4000)]  # blocks below glibc's mmap threshold: they live on the heap
    survivors = [_touch(100) for _ in range(4000)]
    second = [_touch(64_000) for _ in range(4000)]
    grown = rss_gb()
    del first, second
    memory.release()  # gc.collect() alone keeps about half of the 512 MB (measured: 0.26 GB)
    assert grown - start > 0.4
    assert rss_gb() - start < 0.1
    del survivors
