"""Session semantics through the server: parity under interleaving, ordering,
restart, capacity, idle expiry."""
import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serving.client import Client, step_request


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_many_sessions_interleaved_from_concurrent_clients_equal_one_ort_call(
        server, model_repo, kit, cell):
    """200 sessions, 4 clients, random interleaving and random multiplexing."""
    n_sessions, T, n_clients = 200, 12, 4
    rng = np.random.default_rng(10)
    xs = rng.standard_normal((n_sessions, T, 3)).astype(np.float32)
    got = np.zeros((n_sessions, T, 3), np.float32)

    def client_run(c):
        r = random.Random(c)
        mine = list(range(c, n_sessions, n_clients))
        nxt = {s: 0 for s in mine}
        with Client(server.target) as cl, cl.stream(cell) as stream:
            while nxt:
                # one message carries 1..6 distinct random sessions' next steps
                group = r.sample(sorted(nxt), min(len(nxt), r.randint(1, 6)))
                reqs = [step_request(cell, f"{cell}-{s}", xs[s, nxt[s]], start=nxt[s] == 0)
                        for s in group]
                for s, res in zip(group, stream.send(reqs)):
                    assert res.code == 0, res.error
                    got[s, nxt[s]] = kit.array(res.y)[0]
                    assert res.position == nxt[s] + 1
                    nxt[s] += 1
                    if nxt[s] == T:
                        del nxt[s]

    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(client_run, range(n_clients)))
    want = kit.ort_reference(model_repo / cell / "1/model.onnx", xs)["y"]
    assert np.abs(got - want).max() <= 1e-4


def test_concurrent_steps_of_one_session_apply_once_each_in_arrival_order(server, model_repo, kit):
    """Unary steps fired concurrently: positions are a permutation, and the
    outputs equal ORT run on the inputs in the order the positions say."""
    cl = Client(server.target)
    N = 40
    xs = np.random.default_rng(11).standard_normal((N + 1, 3)).astype(np.float32)
    y0, _ = cl.step("lstm", "ordered", xs[0], start=True)
    futures = [cl.stub.Step.future(step_request("lstm", "ordered", xs[i])) for i in range(1, N + 1)]
    replies = [f.result() for f in futures]
    positions = [r.position for r in replies]
    assert sorted(positions) == list(range(2, N + 2))
    order = np.argsort(positions)
    seq = np.concatenate([xs[:1], xs[1:][order]])
    want = kit.ort_reference(model_repo / "lstm/1/model.onnx", seq[None])["y"][0]
    got = np.concatenate([y0] + [kit.array(replies[i].y) for i in order])
    assert np.abs(got - want).max() < 1e-4
    cl.close()


def test_start_on_a_live_session_restarts_it_with_fresh_state(server, kit):
    cl = Client(server.target)
    x = np.random.default_rng(12).standard_normal((5, 3)).astype(np.float32)
    first, _ = cl.step("gru", 900, x, start=True)
    again, pos = cl.step("gru", 900, x, start=True)
    assert pos == 5
    np.testing.assert_allclose(again, first, atol=1e-6)
    # int 900 and "900" are different sessions
    with pytest.raises(grpc.RpcError):
        cl.step("gru", "900", x[:1])
    cl.end_session("gru", 900)
    cl.close()


def test_capacity_and_idle_expiry(model_repo, kit):
    running = kit.start_server(repo=str(model_repo), max_sessions=3, session_idle_s=0.4,
                               max_message_bytes=64 * 1024, max_steps_per_request=8)
    try:
        cl = Client(running.target)
        # limits: message size (gRPC's own check) and sessions per stream message
        with pytest.raises(grpc.RpcError) as e:
            cl.predict("rnn", np.zeros((100, 100, 3), np.float32))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with cl.stream("rnn") as s:
            _, _, errs = s.send_batch(list(range(1, 10)), np.zeros((9, 3), np.float32),
                                      start=[True] * 9)
            assert len(errs) == 9 and "at most 8" in str(errs[0])
            res = s.send([step_request("rnn", i, [0.0, 0.0, 0.0], start=True) for i in range(1, 10)])
            assert all(r.code and "at most 8" in r.error for r in res)
        for s in range(3):
            cl.step("rnn", s + 1, [0.0, 0.0, 0.0], start=True)
        with pytest.raises(grpc.RpcError) as e:
            cl.step("rnn", 4, [0.0, 0.0, 0.0], start=True)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max-sessions" in e.value.details()
        cl.step("rnn", 1, [0.0, 0.0, 0.0], start=True)  # a restart needs no new slot
        cl.end_session("rnn", 2)
        cl.step("rnn", 4, [0.0, 0.0, 0.0], start=True)  # ending freed one
        # keep session 1 busy while the others go idle
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            cl.step("rnn", 1, [0.0, 0.0, 0.0])
            time.sleep(0.1)
        for s in (3, 4):
            with pytest.raises(grpc.RpcError) as e:
                cl.step("rnn", s, [0.0, 0.0, 0.0])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expired" in e.value.details()
        cl.step("rnn", 1, [0.0, 0.0, 0.0])  # the busy one lives on
        assert running.server.sessions.live("rnn") == 1
        cl.close()
    finally:
        running.stop()


def test_batches_form_when_steps_arrive_together(server):
    """A multiplexed message of 50 sessions runs as one cell call."""
    from prometheus_client import REGISTRY

    def count_50():
        return REGISTRY.get_sample_value("seqserve_batch_size_bucket", {"model": "rnn", "le": "64.0"}) or 0
    def count_32():
        return REGISTRY.get_sample_value("seqserve_batch_size_bucket", {"model": "rnn", "le": "32.0"}) or 0

    before64, before32 = count_50(), count_32()
    with Client(server.target) as cl, cl.stream("rnn") as s:
        res = s.send([step_request("rnn", f"b{i}", [0.1, 0.2, 0.3], start=True) for i in range(50)])
    assert all(r.code == 0 for r in res)
    assert count_50() - before64 >= 1 and count_32() == before32


def test_plain_step_fast_path_matches_the_general_path_and_declines_what_it_cannot_do(server, model_repo, kit):
    """SessionManager.try_plain_step (the streaming hot path) gives the numbers,
    positions and last output the general path gives - run at once when the
    model is quiet, queued and flushed as one batch while a batching window
    is open, in arrival order with general steps of the same session - and
    returns None (so the general path decides and reports) whenever it is
    not a plain step of a live session."""
    from serving.runtime import sessions as sessions_mod

    sm = server.server.sessions
    ms = sm.models["gru"]
    xs = np.random.default_rng(12).standard_normal((9, 3)).astype(np.float32)

    async def scenario():
        await sm.step_with_position("gru", None, "fast", xs[:1], start=True)
        await sm.step_with_position("gru", None, "other", xs[:1], start=True)
        taken = []
        for t in range(1, 6):
            ms.last_arrival = 0.0  # quiet: as for a client stepping alone
            res = sm.try_plain_step(ms, "fast", xs[t].tolist())
            taken.append(type(res) is tuple)
            if res is None:
                res = await sm.step_with_position("gru", None, "fast", xs[t:t + 1], checked=True)
            assert res[1] == t + 1
        # busy: a batching window is open, so the steps queue. Steps 6 and 7 of
        # "fast" (7 through the general path) and one of "other": one flush runs
        # them in arrival order, the two of "fast" in two rounds.
        ms.last_arrival = time.monotonic() + 1.0
        ms.batching = True
        q6 = sm.try_plain_step(ms, "fast", xs[6].tolist())
        q_other = sm.try_plain_step(ms, "other", xs[1].tolist())
        g7 = asyncio.ensure_future(sm.step_with_position("gru", None, "fast", xs[7:8], checked=True))
        queued = [isinstance(q, asyncio.Future) for q in (q6, q_other)]
        r6, r_other, r7 = await asyncio.gather(q6, q_other, g7)
        positions = [r6[1], r_other[1], r7[1]]
        # a flush of plain steps only: one batch
        ms.last_arrival = time.monotonic() + 1.0
        q8 = sm.try_plain_step(ms, "fast", xs[8].tolist())
        q_o2 = sm.try_plain_step(ms, "other", xs[2].tolist())
        r8, r_o2 = await asyncio.gather(q8, q_o2)
        positions += [r8[1], r_o2[1]]
        ms.last_arrival = 0.0  # leave the shared server as it was
        state = await sm.read("gru", "fast")
        other = await sm.read("gru", "other")
        declined = {
            "unknown session": sm.try_plain_step(ms, "nobody", xs[0].tolist()),
            "unknown model": sm.models.get("nope"),  # the caller's lookup: no ModelSessions to hand over
            "other tenant": sm.try_plain_step(ms, "fast", xs[0].tolist(), tenant="t2"),
        }
        return taken, queued, positions, state, other, declined

    taken, queued, positions, state, other, declined = server.call(scenario)
    assert all(taken) and all(queued) and sessions_mod.BATCH_WINDOW_S > 0
    assert positions == [7, 2, 8, 9, 3]
    assert all(v is None for v in declined.values()), declined
    want = kit.ort_reference(model_repo / "gru/1/model.onnx", xs[None])
    assert state["position"] == 9
    assert np.abs(state["last_y"] - want["y"][0, -1]).max() <= 1e-4
    assert np.abs(state["h"] - want["hn"][:, 0]).max() <= 1e-4
    want_o = kit.ort_reference(model_repo / "gru/1/model.onnx", xs[None, :3])
    assert other["position"] == 3
    assert np.abs(other["h"] - want_o["hn"][:, 0]).max() <= 1e-4
