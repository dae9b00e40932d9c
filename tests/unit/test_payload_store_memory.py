"""A process that moves payload frames keeps freed frame memory for the next frames.

Without it glibc maps every allocation over 128 KiB afresh and unmaps it when freed, so each
frame read or encoded faults its pages in again (~400 faults per 1.6 MB frame, 2-3x the CPU of
reading it from Redis). Measured in child processes: the policy is process-wide and lasts.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

_CHILD = """
import resource, sys
import redis
from asyncopd.wire.payload_store import PayloadStore
from asyncopd.wire.payload_store import retain_freed_memory
if sys.argv[1] == "store":
    PayloadStore(redis.Redis(port=1), "p")  # a client (never connected): the policy is set
    assert retain_freed_memory() and retain_freed_memory.cache_info().misses == 1  # in effect, set once
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # a batch of 32 frames of 1.6 MB, touched page by page, then freed
    before = faults()
    frames = [bytearray(1_600_000) for _ in range(32)]
    for f in frames:
        f[::4096] = bytes(len(f[::4096]))
    del frames
    print(faults() - before)
"""
PAGES = 32 * 1_600_000 // 4096  # ~12,500 pages a batch


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True, timeout=60)
    return [int(line) for line in out.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_a_payload_client_reuses_freed_frame_memory_instead_of_faulting_it_in_again() -> None:
    plain = _faults("plain")
    assert plain[1] > PAGES // 2, plain  # without: the second batch faults its pages in again
    with_store = _faults("store")
    assert with_store[1] < PAGES // 20, with_store  # with: it reuses the first batch's memory
