"""serving._hotpath: the plain step in C, against ONNX Runtime and the Python path.

PlainSteps makes try_plain_step's decisions in C. Each test drives it and the
Python path (StepIndex.lookup + try_plain_step) on twin sessions of one
SessionManager and compares: the numbers with ONNX Runtime on the whole
sequence, the bookkeeping with the Python path's, and every decline with
"nothing changed".
"""
import asyncio
import shutil
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protos.seqserve.v1 import inference_pb2 as pb
from serving import wire
from serving.wire import ReplyEncoder, StepIndex

if shutil.which("cc") is None:  # pip could not build it: the Python path serves (tested elsewhere)
    pytest.skip("no C compiler here: serving._hotpath is not built", allow_module_level=True)


def test_the_c_hot_path_is_built_and_used_where_a_compiler_is():
    """`pip install` builds the extension where a C compiler is (CI: `make test`);
    without one the Python path serves. A silent fallback would hide a slow server."""
    from serving import _hotpath  # noqa: F401 - the build's product

    assert wire.NATIVE is _hotpath.PlainSteps and wire.HOTPATH == "native (C)"


def _raw(model, seq, values, unary=False) -> bytes:
    step = pb.StepRequest(model=model, x=pb.Tensor(shape=[len(values)], float_data=list(values)))
    if isinstance(seq, str):
        step.sequence_key = seq
    else:
        step.sequence_id = seq
    if unary:
        return step.SerializeToString()
    return pb.StreamStepsRequest(steps=[step]).SerializeToString()


def _y(reply: bytes, unary=False):
    r = pb.StepResponse.FromString(reply) if unary else pb.StreamStepsResponse.FromString(reply).results[0]
    return np.array(r.y.float_data, np.float32), r.position


class Rig:
    """A SessionManager on a loaded registry, with C and Python entries for one model."""

    def __init__(self, repo, model, unary=False):
        from serving._hotpath import PlainSteps
        from serving.runtime.registry import Registry
        from serving.runtime.sessions import BATCH_WINDOW_S, SessionManager, queue_item

        self.model, self.unary = model, unary
        self.sm = SessionManager(Registry.load(str(repo)), max_sessions=100_000)
        self.ms = self.sm.model_sessions(model, None)
        self.F = self.ms.info.input_features
        self.index = StepIndex()
        self.c = PlainSteps(self.index, self.sm, BATCH_WINDOW_S, queue_item, unary)

    async def start(self, seq, x0):
        """Start `seq` with x0 (general path), and teach the index its plain step."""
        y = await self.sm.step(self.model, None, seq, np.asarray(x0, np.float32)[None], start=True)
        raw = _raw(self.model, seq, x0, self.unary)
        msg = (pb.StepRequest if self.unary else pb.StreamStepsRequest).FromString(raw)
        vals = list((msg if self.unary else msg.steps[0]).x.float_data)
        self.index.learn(raw, msg, vals, self.ms, seq, self.model)
        return y[0]

    def quiet(self):
        """No arrival inside the batching window: the next step runs inline."""
        self.ms.last_arrival = 0.0

    def python(self, seq, x):
        """The Python path's answer for one step (inline when quiet)."""
        ms, s, model, vals = self.index.lookup(_raw(self.model, seq, x, self.unary))
        y, pos = self.sm.try_plain_step(ms, s, vals)
        return y[0].copy(), pos

    def state(self, slot):
        st = self.ms.cell.one_state
        return (self.ms.position[slot], self.ms.last_y[slot].copy(), st.h[slot].copy(),
                st.c[slot].copy() if st.c.shape[0] > 1 else None)


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn"])
def test_c_steps_match_onnx_runtime_and_the_python_path_bit_for_bit(model_repo, kit, model):
    rig = Rig(model_repo, model)
    x = np.random.default_rng(3).standard_normal((2, 40, rig.F)).astype(np.float32)

    async def run():
        ys = {"c": [await rig.start("c", x[0, 0])], "py": [await rig.start("py", x[1, 0])]}
        pos = {"c": [1], "py": [1]}
        for t in range(1, 40):
            rig.quiet()
            reply = rig.c(_raw(model, "c", x[0, t]), "")
            assert reply.__class__ is bytes, "a quiet model's plain step runs in C"
            y, p = _y(reply)
            ys["c"].append(y)
            pos["c"].append(p)
            rig.quiet()
            y, p = rig.python("py", x[1, t])
            ys["py"].append(y)
            pos["py"].append(p)
        return ys, pos

    ys, pos = asyncio.run(run())
    assert pos["c"] == pos["py"] == list(range(1, 41))
    path = model_repo / model / "1" / "model.onnx"
    for b, who in enumerate(("c", "py")):
        want = kit.ort_reference(path, x[b:b + 1])["y"][0]
        assert np.abs(np.array(ys[who]) - want).max() < 1e-4
    # the same kernel on the same inputs: the C path's numbers are the Python path's
    twin = Rig(model_repo, model)

    async def python_only():
        out = [await twin.start("c", x[0, 0])]
        for t in range(1, 40):
            twin.quiet()
            out.append(twin.python("c", x[0, t])[0])
        return out

    np.testing.assert_array_equal(np.array(ys["c"]), np.array(asyncio.run(python_only())))
    assert rig.ms.last_used[rig.ms.table["c"]] > 0 and rig.ms.ans_expect[rig.ms.table["c"]] == -1


def test_unary_replies_are_step_responses(model_repo, kit):
    rig = Rig(model_repo, "lstm", unary=True)
    x = np.random.default_rng(4).standard_normal((1, 10, rig.F)).astype(np.float32)

    async def run():
        ys = [await rig.start(77, x[0, 0])]
        for t in range(1, 10):
            rig.quiet()
            y, p = _y(rig.c(_raw("lstm", 77, x[0, t], unary=True), ""), unary=True)
            assert p == t + 1
            ys.append(y)
        return ys

    want = kit.ort_reference(model_repo / "lstm/1/model.onnx", x)["y"][0]
    assert np.abs(np.array(asyncio.run(run())) - want).max() < 1e-4


def test_a_busy_model_queues_the_step_in_c_and_the_flush_batches_it(model_repo, kit):
    """Within the batching window the step joins the model's queue (a future);
    the flush runs the queued steps of several sessions as one batch."""
    rig = Rig(model_repo, "gru")
    x = np.random.default_rng(5).standard_normal((3, 6, rig.F)).astype(np.float32)
    sizes = []

    class Sizes:
        def observe(self, n):
            sizes.append(n)

    async def run():
        ys = {b: [await rig.start(b + 1, x[b, 0])] for b in range(3)}
        rig.ms.batch_sizes = Sizes()
        for t in range(1, 6):
            rig.ms.batching = True
            rig.ms.last_arrival = time.monotonic() + 10  # an arrival "just now": busy
            futs = [rig.c(_raw("gru", b + 1, x[b, t]), "") for b in range(3)]
            assert all(isinstance(f, asyncio.Future) for f in futs)
            assert len(rig.ms.pending) == rig.ms.n_plain == 3 and rig.ms.scheduled
            for b, f in enumerate(futs):
                y, pos = await f
                assert pos == t + 1
                ys[b].append(y[0].copy())
        return ys

    ys = asyncio.run(run())
    assert sizes == [3] * 5
    for b in range(3):
        want = kit.ort_reference(model_repo / "gru/1/model.onnx", x[b:b + 1])["y"][0]
        assert np.abs(np.array(ys[b]) - want).max() < 1e-4


def test_every_decline_hands_the_step_back_unchanged(model_repo):
    """What C does not decide comes back as StepIndex.lookup's tuple, with no state
    touched; a message never met is None."""
    rig = Rig(model_repo, "lstm")
    x0 = [0.5] * rig.F

    async def run():
        await rig.start(5, x0)
        slot = rig.ms.table[5]
        before = rig.state(slot)

        def declined(raw, tenant=""):
            rig.quiet()
            hit = rig.c(raw, tenant)
            assert hit.__class__ is tuple, hit
            want = rig.index.lookup(raw)
            assert hit[:3] == want[:3] and np.array_equal(hit[3], want[3], equal_nan=True)
            after = rig.state(slot)
            for a, b in zip(before, after):
                assert a is b is None or np.array_equal(a, b)

        nan = list(x0)
        nan[-1] = float("nan")
        declined(_raw("lstm", 5, nan))  # the Python path reports the NaN
        declined(_raw("lstm", 5, [float("inf")] + x0[1:]))
        declined(_raw("lstm", 5, x0), tenant="acme")  # tenants' keys: the Python path
        rig.ms.pending.append(object())  # a full queue: the general path refuses with the limit
        rig.sm.max_queue = 1
        declined(_raw("lstm", 5, x0))
        assert len(rig.ms.pending) == 1 and not rig.ms.scheduled
        rig.ms.pending.clear()
        rig.sm.max_queue = 10_000
        rig.sm.closing = True
        declined(_raw("lstm", 5, x0))
        rig.sm.closing = False
        models = rig.sm.models
        rig.sm.models = {"lstm": object()}  # the model was reloaded: another ModelSessions
        declined(_raw("lstm", 5, x0))
        rig.sm.models = models
        rig.ms.table.pop(5)  # ended meanwhile
        declined(_raw("lstm", 5, x0))
        rig.ms.table[5] = rig.ms.capacity + 10  # a slot past the arrays: refused, not written
        declined(_raw("lstm", 5, x0))
        rig.ms.table[5] = slot
        assert rig.c(_raw("lstm", 6, x0), "") is None  # never met
        assert rig.c(b"\x0a\x00", "") is None
        assert rig.c(pb.StreamStepsRequest(), "") is None  # not bytes
        rig.quiet()
        assert rig.c(_raw("lstm", 5, x0), "").__class__ is bytes  # and it still steps
        assert rig.state(slot)[0] == before[0] + 1

    asyncio.run(run())


def test_c_follows_the_arrays_when_the_sessions_table_grows(model_repo):
    """Growing the table replaces every per-slot array: C lets go of the old ones."""
    rig = Rig(model_repo, "rnn")
    x = np.random.default_rng(6).standard_normal((30, rig.F)).astype(np.float32)

    async def run():
        await rig.start("old", x[0])
        await rig.start("twin", x[0])
        for t in range(1, 10):
            rig.quiet()
            assert rig.c(_raw("rnn", "old", x[t]), "").__class__ is bytes
            rig.quiet()
            rig.python("twin", x[t])
        cap = rig.ms.capacity
        h_before = rig.ms.cell.one_state.h
        for i in range(cap):  # past the capacity: the arrays are reallocated
            await rig.sm.step("rnn", None, f"fill-{i}", x[:1], start=True)
        assert rig.ms.capacity > cap and rig.ms.cell.one_state.h is not h_before
        for t in range(10, 30):
            rig.quiet()
            y, pos = _y(rig.c(_raw("rnn", "old", x[t]), ""))
            rig.quiet()
            y2, pos2 = rig.python("twin", x[t])
            assert pos == pos2 == t + 1
            np.testing.assert_array_equal(y, y2)

    asyncio.run(run())


@settings(max_examples=200, deadline=None)
@given(out=st.integers(1, 300), position=st.integers(1, 2**62), seed=st.integers(0, 2**32 - 1),
       unary=st.booleans())
def test_c_replies_are_the_python_encoders_bytes(out, position, seed, unary):
    from serving._hotpath import encode_reply

    y = np.random.default_rng(seed).standard_normal((1, out)).astype(np.float32)
    enc = ReplyEncoder(out)
    want = enc.unary_reply(y, position) if unary else enc.step_reply(y, position)
    assert encode_reply(y.tobytes(), position, unary) == want


@pytest.mark.parametrize("path", ["native", "python"])
def test_live_streams_through_either_hot_path_match_onnx_runtime(model_repo, kit, monkeypatch, path):
    """A real server, C hot path or Python path (what a machine without a compiler
    runs): 8 concurrent streams (so steps both run inline and queue for batches),
    a bad step on each between good ones, every good output against ONNX Runtime."""
    import threading

    from serving.client import Client, StepError

    if path == "python":
        monkeypatch.setattr(wire, "NATIVE", None)
    running = kit.start_server(repo=str(model_repo), max_sessions=100)
    try:
        hot = running.server.servicer._stream_hot
        assert (type(hot).__name__ == "PlainSteps") == (path == "native")
        x = np.random.default_rng(9).standard_normal((8, 25, 3)).astype(np.float32)
        ys, errs = {}, []

        def client_run(b):
            try:
                with Client(running.target) as c, c.stream("lstm") as s:
                    out = [s.step(f"{path}-{b}", x[b, 0], start=True)[0][0]]
                    for t in range(1, 25):
                        y, pos = s.step(f"{path}-{b}", x[b, t])
                        assert pos == t + 1
                        out.append(y[0])
                        if t == 10:
                            with pytest.raises(StepError, match="NaN"):
                                s.step(f"{path}-{b}", np.full(3, np.nan, np.float32))
                    ys[b] = out
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errs.append(exc)

        threads = [threading.Thread(target=client_run, args=(b,)) for b in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errs, errs
        want = kit.ort_reference(model_repo / "lstm/1/model.onnx", x)["y"]
        for b in range(8):
            assert np.abs(np.array(ys[b]) - want[b]).max() < 1e-4
    finally:
        running.stop()


def test_c_paths_leak_nothing(model_repo):
    """10,000 rounds of every branch (inline, queued, declined, never met): the
    memory Python's allocators hold does not grow. A leaked reply, future,
    tuple or float per step would be megabytes."""
    import gc
    import tracemalloc

    rig = Rig(model_repo, "lstm")
    x0 = [0.5] * rig.F
    nan = [float("nan")] * rig.F

    async def run():
        await rig.start("a", x0)
        await rig.start("b", x0)
        ra, rb, rnan = _raw("lstm", "a", x0), _raw("lstm", "b", x0), _raw("lstm", "a", nan)

        async def rounds(n):
            for _ in range(n):
                rig.quiet()
                assert rig.c(ra, "").__class__ is bytes
                rig.ms.last_arrival = time.monotonic() + 10  # busy: both queue
                f1, f2 = rig.c(ra, ""), rig.c(rb, "")
                await f1
                await f2
                assert rig.c(rnan, "").__class__ is tuple and rig.c(ra, "t").__class__ is tuple
                assert rig.c(b"never met", "") is None

        await rounds(2_000)  # caches, free lists and the like settle first
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await rounds(10_000)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 64 * 1024, f"{grown} bytes held after 10,000 rounds"

    asyncio.run(run())


@settings(max_examples=150, deadline=None)
@given(tail=st.binary(min_size=0, max_size=24), cut=st.integers(0, 8))
@example(tail=b"", cut=0)  # the step itself
@example(tail=b"\x01\x02\x03\x04", cut=4)  # new finite values
@example(tail=b"\x00\x00\xc0\x7f", cut=4)  # a NaN
@example(tail=b"\x00\x00\x80\xff", cut=4)  # -inf
def test_c_recognises_exactly_what_the_python_index_recognises(rig_lstm, tail, cut):
    """Any bytes after (part of) a known head: C answers bytes only where the Python
    index finds a plain step with finite values, and otherwise the same tuple or None."""
    rig, raw = rig_lstm
    msg = raw[:len(raw) - cut] + tail
    rig.quiet()
    want = rig.index.lookup(msg)
    got = rig.c(msg, "")
    if want is None:
        assert got is None
    elif all(np.isfinite(want[3])):
        assert got.__class__ is bytes
    else:
        assert got.__class__ is tuple and got[:3] == want[:3]
        np.testing.assert_array_equal(np.array(got[3]), np.array(want[3]))


@pytest.fixture(scope="module")
def rig_lstm(model_repo):
    rig = Rig(model_repo, "lstm")
    x0 = [0.5] * rig.F
    loop = asyncio.new_event_loop()
    loop.run_until_complete(rig.start(11, x0))
    yield rig, _raw("lstm", 11, x0)
    loop.close()
