"""Bulk work (loading, big Predicts) runs in threads below the event loop's CPU priority."""
import asyncio
import os
import threading

import pytest

from serving import bulk


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="per-thread nice is Linux's")
def test_default_executor_threads_and_their_children_are_nicer():
    async def main():
        bulk.install(asyncio.get_running_loop(), nice=7, workers=2)
        loop_nice = bulk.thread_nice()

        def work():
            child = {}
            t = threading.Thread(target=lambda: child.setdefault("nice", bulk.thread_nice()))
            t.start()
            t.join()  # a thread started by a worker (as ONNX Runtime's pool is) inherits the value
            return bulk.thread_nice(), threading.get_native_id(), child["nice"]

        worker_nice, tid, child_nice = await asyncio.to_thread(work)
        return loop_nice, worker_nice, tid, child_nice

    loop_nice, worker_nice, tid, child_nice = asyncio.run(main())
    assert worker_nice == min(19, loop_nice + 7) == child_nice
    assert bulk.thread_nice() == loop_nice  # the caller's own priority is untouched


def test_zero_disables_and_settings_check_the_range():
    from serving.settings import from_args

    assert bulk.lower_priority(0) is False
    assert from_args(["--bulk-nice", "0"]).bulk_nice == 0
    with pytest.raises(ValueError, match="--bulk-nice must be 0..19"):
        from_args(["--bulk-nice", "25"])
