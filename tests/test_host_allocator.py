"""The CPU training loop keeps freed host memory for the next step, and gives it back afterwards."""

import os

import pytest
import torch

from tuneforge import host_allocator

pytestmark = pytest.mark.skipif(host_allocator.glibc() is None, reason="glibc's allocator only")
MIB = 1024 * 1024


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def allocate_and_free() -> tuple[int, int]:
    """Resident bytes with a touched 24 MiB buffer alive, then right after it is freed."""
    buffer = torch.ones(6 * MIB)
    alive = resident()
    del buffer
    return alive, resident()


def test_freed_buffers_stay_in_the_process_until_the_block_ends():
    with host_allocator.keep_freed_memory():
        alive, freed = allocate_and_free()
        assert freed > alive - 8 * MIB  # kept for the next step: no fresh pages to zero-fill
    assert resident() < freed - 16 * MIB  # handed back on leaving


def test_a_user_who_set_glibc_variables_keeps_them(monkeypatch):
    calls = []

    class RecordingLibc:
        def mallopt(self, *args):
            calls.append(args)

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    monkeypatch.setattr(host_allocator, "glibc", RecordingLibc)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    with host_allocator.keep_freed_memory():
        pass
    assert calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    with host_allocator.keep_freed_memory():
        assert calls == [(host_allocator.M_MMAP_THRESHOLD, 32 * MIB), (host_allocator.M_TRIM_THRESHOLD, 2**31 - 1)]
    assert calls[2:] == [(host_allocator.M_TRIM_THRESHOLD, 128 * 1024), ("trim", 0)]
