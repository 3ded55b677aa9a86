"""Exactly-once steps: expected positions, retries answered from storage, resynchronisation.

The fault test drops replies at random (and cuts deadlines so short that the
server sometimes drops the step itself) and retries: 10,000 steps over 100
sessions through three paths (packed stream batches, multiplexed stream
messages, concurrent unary calls); every answer and every session's final
state must equal one ONNX Runtime call on the whole sequence.
"""
import random
import threading

import grpc
import numpy as np
import pytest

from protos.seqserve.v1 import inference_pb2 as pb
from serving.client import Client, StepError, position_of, step_request

MODEL = "lstm"
F = 3


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target) as c:
        yield c


def test_retry_returns_stored_answer_and_mismatch_is_aborted(client, server):
    x = np.random.default_rng(0).normal(size=(4, F)).astype(np.float32)
    y0, p0 = client.step(MODEL, "eo-1", x[0], start=True, expected_position=0)
    again, p0b = client.step(MODEL, "eo-1", x[0], start=True, expected_position=0)  # lost reply
    assert (p0, p0b) == (1, 1)
    np.testing.assert_array_equal(y0, again)
    y1, p1 = client.step(MODEL, "eo-1", x[1], expected_position=1)
    y1b, p1b = client.step(MODEL, "eo-1", x[1], expected_position=1)
    assert (p1, p1b) == (2, 2)
    np.testing.assert_array_equal(y1, y1b)
    # a chunk retried: the whole stored chunk comes back
    yc, pc = client.step(MODEL, "eo-1", x[2:4], expected_position=2)
    yc2, pc2 = client.step(MODEL, "eo-1", x[2:4], expected_position=2)
    assert (pc, pc2) == (4, 4) and yc.shape == (2, 3)
    np.testing.assert_array_equal(yc, yc2)
    # a stale or future position: ABORTED with the actual position, nothing applied
    for wrong in (1, 7):
        with pytest.raises(grpc.RpcError) as err:
            client.step(MODEL, "eo-1", x[0], expected_position=wrong)
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert position_of(err.value) == 4 and "position 4" in err.value.details()
    # the plain API without positions still works and moves the session on
    _, p = client.step(MODEL, "eo-1", x[0])
    assert p == 5
    # a start at a later position of a session that does not exist: resynchronise from 0
    with pytest.raises(grpc.RpcError) as err:
        client.step(MODEL, "eo-missing", x[0], start=True, expected_position=3)
    assert err.value.code() == grpc.StatusCode.ABORTED and position_of(err.value) == 0
    with pytest.raises(grpc.RpcError) as err:  # and it was not created
        client.step(MODEL, "eo-missing", x[0])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_and_batch_carry_positions(client):
    x = np.random.default_rng(1).normal(size=(3, F)).astype(np.float32)
    with client.stream(MODEL) as s:
        y, p = s.step("eo-s", x[0], start=True, expected_position=0)
        y2, p2 = s.step("eo-s", x[0], start=True, expected_position=0)
        np.testing.assert_array_equal(y, y2)
        with pytest.raises(StepError) as err:
            s.step("eo-s", x[1], expected_position=5)
        assert err.value.code == grpc.StatusCode.ABORTED and err.value.position == 1
        yb, pos, errs = s.send_batch(["eo-b1", "eo-b2"], x[:2], start=[True, True],
                                     expected_positions=[0, 0])
        yb2, pos2, errs2 = s.send_batch(["eo-b1", "eo-b2"], x[:2], start=[True, True],
                                        expected_positions=[0, 0])
        assert not errs and not errs2 and list(pos) == [1, 1] and list(pos2) == [1, 1]
        np.testing.assert_array_equal(yb, yb2)
        _, pos3, errs3 = s.send_batch(["eo-b1", "eo-b2"], x[1:3], expected_positions=[1, 3])
        assert list(errs3) == [1] and errs3[1].code == grpc.StatusCode.ABORTED
        assert list(pos3) == [2, 1]


def test_fault_injection_10000_steps_100_sessions_exactly_once(server, model_repo, kit):
    S, T = 100, 100
    rng = np.random.default_rng(7)
    xs = rng.normal(size=(S, T, F)).astype(np.float32)
    want = kit.ort_reference(model_repo / MODEL / "1" / "model.onnx", xs)  # y (S, T, out)
    got = np.full((S, T, 3), np.nan, np.float32)
    ids = [f"fault-{i}" for i in range(S)]
    packed, muxed, unary = range(0, 60), range(60, 90), range(90, 100)
    stats = {"dropped": 0, "deadline": 0, "aborted": 0}
    lock = threading.Lock()

    def apply_answer(i, t, y):
        if not np.isnan(got[i, t]).all():  # a retry's answer must equal the first one
            np.testing.assert_array_equal(got[i, t], y)
        got[i, t] = y

    def run_packed(c: Client):
        r = random.Random(1)
        pos = {i: 0 for i in packed}
        with c.stream(MODEL) as s:
            while any(p < T for p in pos.values()):
                rows = [i for i in packed if pos[i] < T]
                x = np.stack([xs[i, pos[i]] for i in rows])
                y, positions, errs = s.send_batch([ids[i] for i in rows], x,
                                                  start=[pos[i] == 0 for i in rows],
                                                  expected_positions=[pos[i] for i in rows])
                assert not errs, errs
                if r.random() < 0.15:  # the whole reply is lost
                    stats["dropped"] += len(rows)
                    continue
                for k, i in enumerate(rows):
                    if r.random() < 0.25:  # this row's answer is lost
                        stats["dropped"] += 1
                        continue
                    assert positions[k] == pos[i] + 1
                    apply_answer(i, pos[i], y[k])
                    pos[i] += 1

    def run_muxed(c: Client):
        r = random.Random(2)
        pos = {i: 0 for i in muxed}
        with c.stream(MODEL) as s:
            while any(p < T for p in pos.values()):
                rows = [i for i in muxed if pos[i] < T and r.random() < 0.8] or \
                    [i for i in muxed if pos[i] < T]
                results = s.send([step_request(MODEL, ids[i], xs[i, pos[i]], start=pos[i] == 0,
                                               expected_position=pos[i]) for i in rows])
                for i, res in zip(rows, results):
                    assert res.code == 0, res.error
                    if r.random() < 0.3:
                        stats["dropped"] += 1
                        continue
                    assert res.position == pos[i] + 1
                    apply_answer(i, pos[i], np.array(res.y.float_data, np.float32))
                    pos[i] += 1

    def run_unary(c: Client, mine):
        r = random.Random(mine[0])
        for i in mine:
            t = 0
            while t < T:
                # a deadline so short that the call often fails: the step was either
                # dropped before it ran or ran with its reply lost; the retry tells
                short = r.random() < 0.2
                try:
                    y, p = c.step(MODEL, ids[i], xs[i, t], start=t == 0, expected_position=t,
                                  timeout=0.001 if short else 10)
                except grpc.RpcError as exc:
                    code = exc.code()
                    assert code in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.CANCELLED), (code, exc.details())
                    with lock:
                        stats["deadline"] += 1
                    continue
                if r.random() < 0.2:
                    with lock:
                        stats["dropped"] += 1
                    continue
                assert p == t + 1
                apply_answer(i, t, y[0])
                t += 1

    with Client(server.target) as c1, Client(server.target) as c2:
        threads = [threading.Thread(target=run_packed, args=(c1,)),
                   threading.Thread(target=run_muxed, args=(c2,))]
        threads += [threading.Thread(target=run_unary, args=(c1, list(unary)[k::3]))
                    for k in range(3)]
        errors = []

        def guard(fn):
            def run(*a):
                try:
                    fn(*a)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                    errors.append(exc)
            return run

        for th in threads:
            th._target = guard(th._target)
            th.start()
        for th in threads:
            th.join(120)
        if errors:
            raise errors[0]

    assert stats["dropped"] > 1000, stats  # the faults really happened
    np.testing.assert_allclose(got, want["y"], atol=1e-4)  # no step lost, none applied twice
    for i in range(S):
        state = server.call(lambda i=i: server.server.sessions.read(MODEL, ids[i]))
        assert state["position"] == T
        np.testing.assert_allclose(state["h"], want["hn"][:, i], atol=1e-4)
        np.testing.assert_allclose(state["c"], want["cn"][:, i], atol=1e-4)
    print(f"fault test: {S * T} steps, {stats}")
