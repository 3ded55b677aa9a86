"""Overload: bounded queues refuse at once; deadlines drop queued work without half-applying it."""
import asyncio
import time

import grpc
import numpy as np
import pytest

from protos.seqserve.v1 import inference_pb2 as pb
from serving.client import Client, step_request
from serving.errors import DeadlineExceeded

MODEL, F = "lstm", 3


@pytest.fixture(scope="module")
def small(model_repo, kit):
    running = kit.start_server(repo=str(model_repo), max_queue=4, max_concurrent_rpcs=3)
    yield running
    running.stop()


def test_full_queue_refuses_new_work_at_once(small):
    chunk = np.ones((2, F), np.float32)  # chunks take the queued path of a multiplexed message
    with Client(small.target) as c, c.stream(MODEL) as s:
        t0 = time.perf_counter()
        results = s.send([step_request(MODEL, f"q{i}", chunk, start=True) for i in range(10)])
        took = time.perf_counter() - t0
    codes = [r.code for r in results]
    assert codes[:4] == [0] * 4
    assert set(codes[4:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert "--max-queue" in results[4].error
    assert took < 5  # refused, not waited on
    # refused starts created nothing: the ids are unknown
    with Client(small.target) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.step(MODEL, "q7", np.ones(F, np.float32))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_rpc_limit_refuses_with_resource_exhausted(small):
    with Client(small.target) as c:
        streams = [c.stream(MODEL) for _ in range(3)]
        try:
            for k, s in enumerate(streams):  # three live RPCs: the limit
                s.step(f"held{k}", np.ones(F, np.float32), start=True)
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as err:
                c.step(MODEL, "fourth", np.ones(F, np.float32), start=True)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.perf_counter() - t0 < 2
        finally:
            for s in streams:
                s.close()
        for _ in range(50):  # room again once the streams have finished on the server
            try:
                c.step(MODEL, "fourth", np.ones(F, np.float32), start=True)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.1)
        else:
            pytest.fail("the RPC limit did not free up after the streams closed")


def test_expired_deadline_drops_queued_work_and_undoes_its_bookkeeping(small):
    sm = small.server.sessions
    x = np.ones((1, F), np.float32)

    async def scenario():
        await sm.step_with_position(MODEL, None, "dl", x, start=True)  # position 1
        deadline = time.monotonic() + 0.01
        # queued (a multiplexed call always queues): a 2-step chunk that would end "dl",
        # and a start of a new session "dl-new"
        task = asyncio.ensure_future(sm.step_many(
            [(MODEL, None, "dl", np.ones((2, F), np.float32), False, True, ""),
             (MODEL, None, "dl-new", x, True, False, "")], deadline=deadline))
        await asyncio.sleep(0)  # the task admits its items; the flush is scheduled
        time.sleep(0.03)  # the event loop is busy past the deadline
        results = await task
        state = await sm.read(MODEL, "dl")
        live_new = sm.models[MODEL].table.get("dl-new")
        return results, state["position"], live_new

    results, position, live_new = small.call(scenario)
    assert all(isinstance(r, DeadlineExceeded) for r in results), results
    assert position == 1  # not stepped, not ended
    assert live_new is None  # the start that never ran created no session
    with pytest.raises(DeadlineExceeded):  # already past at arrival: refused before admission
        small.call(lambda: sm.step_with_position(MODEL, None, "dl", x,
                                                 deadline=time.monotonic() - 1))


def test_shutting_down_is_unavailable(model_repo, kit):
    running = kit.start_server(repo=str(model_repo))
    try:
        running.server.sessions.close()  # what stop() does first
        with Client(running.target) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.step(MODEL, "late", np.ones(F, np.float32), start=True)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with c.stream(MODEL) as s:
                _, _, errs = s.send_batch(["a", "b"], np.ones((2, F), np.float32), start=[1, 1])
                assert {e.code for e in errs.values()} == {grpc.StatusCode.UNAVAILABLE}
    finally:
        running.stop()


def test_limits_come_from_flags_and_environment():
    from serving.settings import from_args

    s = from_args(["--max-queue", "7"], env={"SEQSERVE_MAX_SESSIONS_PER_TENANT": "3",
                                              "SEQSERVE_MAX_QUEUE": "9",
                                              "SEQSERVE_MAX_CONCURRENT_RPCS": "5"})
    assert (s.max_queue, s.max_sessions_per_tenant, s.max_concurrent_rpcs) == (7, 3, 5)
    for argv, words in ((["--max-queue", "0"], "--max-queue"),
                        (["--tls-cert", "c.pem"], "--tls-key"),
                        (["--tls-client-ca", "ca.pem"], "--tls-cert"),
                        (["--auth-tokens", "/nonexistent.json"], "no such file")):
        with pytest.raises(ValueError, match=words):
            from_args(argv, env={})


def test_big_predicts_run_off_the_loop_and_are_bounded(model_repo, kit):
    """Work above OrtModel.runs_inline's bound runs in a worker thread, at most
    --max-predict-inflight per model; more are refused at once. Small Predicts
    stay inline."""
    running = kit.start_server(repo=str(model_repo), max_predict_inflight=1)
    try:
        ort_model = running.server.registry.get(MODEL).ort
        small_x = np.ones((1, 5, F), np.float32)
        big = np.random.default_rng(0).standard_normal((64, 1000, F)).astype(np.float32)
        assert ort_model.runs_inline(small_x) and not ort_model.runs_inline(big)

        async def scenario():
            async with grpc.aio.insecure_channel(running.target) as ch:
                predict = ch.unary_unary("/seqserve.v1.Inference/Predict",
                                         request_serializer=pb.PredictRequest.SerializeToString,
                                         response_deserializer=pb.PredictResponse.FromString)
                req = pb.PredictRequest(model=MODEL, x=pb.Tensor(shape=big.shape, float_data=big.ravel()))
                calls = [predict(req) for _ in range(6)]
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            return outcomes

        outcomes = asyncio.run(scenario())
        ok = [o for o in outcomes if isinstance(o, pb.PredictResponse)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(ok) + len(refused) == 6 and ok and refused
        assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "--max-predict-inflight" in refused[0].details()
        want = kit.ort_reference(model_repo / f"{MODEL}/1/model.onnx", big)["y"]
        assert np.abs(kit.array(ok[0].y) - want).max() < 1e-4
    finally:
        running.stop()
