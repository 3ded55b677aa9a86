"""Bulk work runs in worker threads at a lower CPU priority than the event loop.

The event loop answers every stream step, health check and refusal; ONNX
Runtime's whole-sequence Predict calls are the heavy work. On a machine whose
cores the heavy work saturates, an event loop competing on equal terms gets
a fraction of a core, and then even a refusal ("queue full, retry") waits
tens of milliseconds for its turn. So the loop's default executor, which runs
model loading and the Predict calls too big to run inline, is a pool whose
threads raise their own nice value on start. Threads a worker creates inherit
it: ONNX Runtime's intra-op thread pools are built while loading models in
that pool, so they run at the lower priority too.

Linux keeps a nice value per thread; elsewhere (or without permission) the
pool still works, at normal priority, and says so in the log.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("seqserve.bulk")


def lower_priority(nice: int) -> bool:
    """Raise the calling thread's nice value by `nice` (capped at 19); True if it took."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return False
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + nice))
        return True
    except OSError as exc:
        log.warning("bulk worker kept its CPU priority (setpriority: %s)", exc)
        return False


def thread_nice() -> int:
    """The calling thread's nice value."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def install(loop: asyncio.AbstractEventLoop, nice: int, workers: int | None = None) -> ThreadPoolExecutor:
    """Make a low-priority pool the loop's default executor (asyncio.to_thread uses it)."""
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="seqserve-bulk",
                              initializer=lower_priority, initargs=(nice,))
    loop.set_default_executor(pool)
    return pool
