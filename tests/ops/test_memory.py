"""The C heap helpers against the real glibc, each probe in a fresh interpreter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from appliance.ops.memory import HeapTrim

_PROBE = """
import ctypes, json

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = anon()
# 64 MiB in blocks below glibc's mmap threshold, all written, then one block above them
# so the freed memory is not at the top of the heap, where free() would return it itself.
blocks = [libc.malloc(64 << 10) for _ in range(1024)]
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
pin = libc.malloc(64)
for block in blocks:
    libc.free(block)
held = anon()
# Imported only now: what it imports would change the heap's layout before the probe.
from appliance.ops import memory
released = memory.release_free_heap()
print(json.dumps({"before": before, "held": held, "after": anon(), "released": released,
                  "limited": memory.limit_arenas({}), "kept": memory.limit_arenas(
                      {"MALLOC_ARENA_MAX": "8"})}))
"""


def _probe() -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_freed_heap_goes_back_to_the_kernel() -> None:
    found = _probe()
    assert found["held"] - found["before"] >= 48, found  # free() alone kept it
    assert found["released"]
    assert found["held"] - found["after"] >= 48, found


def test_arena_limit_is_set_unless_the_environment_sets_one() -> None:
    found = _probe()
    assert found["limited"]
    assert not found["kept"]  # MALLOC_ARENA_MAX in the environment: glibc's own reading


async def test_heap_trim_waits_for_the_models() -> None:
    loaded = asyncio.Event()
    async with HeapTrim(loaded.wait) as unit:
        task = unit._task
        assert task is not None
        await asyncio.sleep(0.05)
        assert not task.done()  # models still loading: nothing to give back yet
        loaded.set()
        await asyncio.wait_for(asyncio.shield(task), 10)
        assert task.exception() is None
    # Stopping before the models loaded cancels the wait and leaves nothing running.
    async with HeapTrim(asyncio.Event().wait) as early:
        pending = early._task
    assert pending is not None and pending.cancelled()
