"""The Open Inference Protocol through the real tritonclient[grpc] 2.73.0.

The server and models are the serving suite's own (tests/serving/conftest.py:
`model_repo` of random-weight exports, `server` = serving.server.Server on
127.0.0.1:0 in a thread with its own event loop, so the blocking tritonclient
can call it). Answers are compared with an independent ONNX Runtime session
on the same files.
"""
from __future__ import annotations

import queue
import random
from functools import partial
from types import SimpleNamespace

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from protos.inference import messages as pb

TOL = 1e-4
# conftest's model_repo: lstm (3 features, 16 hidden, 2 layers), lm (LSTM over a
# 12-word vocabulary, 1 layer), bi (bidirectional GRU, cannot stream)
LSTM, TOKENS, BIDI = "lstm", "lm", "bi"
FEATURES, HIDDEN, LAYERS, VOCAB = 3, 16, 2, 12


@pytest.fixture(scope="module")
def oip_server(server, model_repo):
    paths = {name: model_repo / name / "1" / "model.onnx" for name in (LSTM, TOKENS, BIDI)}
    return SimpleNamespace(address=server.target, paths=paths, repo=model_repo)


@pytest.fixture(scope="module")
def client(oip_server):
    with triton.InferenceServerClient(oip_server.address) as c:
        yield c


@pytest.fixture(scope="module")
def reference(oip_server):
    """Whole-sequence answers from ONNX Runtime on the model files themselves."""
    sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in oip_server.paths.items()}

    def run(name, x, h0=None, c0=None):
        sess = sessions[name]
        feeds = {"x": x}
        for i in sess.get_inputs()[1:]:
            given = {"h0": h0, "c0": c0}[i.name]
            rows = i.shape[0]  # layers * directions, fixed in the file
            feeds[i.name] = given if given is not None else \
                np.zeros((rows, x.shape[0], HIDDEN), np.float32)
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    return run


def infer_input(name, array, datatype=None):
    item = triton.InferInput(name, list(array.shape), datatype or triton.np_to_triton_dtype(array.dtype))
    item.set_data_from_numpy(array)
    return item


def series(rng, batch, steps):
    return rng.normal(size=(batch, steps, FEATURES)).astype(np.float32)


# ---- health and metadata ---------------------------------------------------------


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(LSTM)
    assert client.is_model_ready(LSTM, "1")
    assert not client.is_model_ready(LSTM, "7")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "seqserve"
    assert "sequence" in meta["extensions"]


def test_model_metadata(client, oip_server):
    meta = client.get_model_metadata(LSTM, as_json=True)
    assert meta["name"] == LSTM and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
    assert inputs == {"x": ("FP32", [-1, -1, FEATURES]),
                      "h0": ("FP32", [LAYERS, -1, HIDDEN]), "c0": ("FP32", [LAYERS, -1, HIDDEN])}
    assert outputs == {"y": ("FP32", [-1, -1, FEATURES]),
                       "hn": ("FP32", [LAYERS, -1, HIDDEN]), "cn": ("FP32", [LAYERS, -1, HIDDEN])}
    # and it is what the ONNX file itself declares (symbolic axes -> -1)
    onnx_types = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
    for name in (LSTM, TOKENS, BIDI):
        meta = client.get_model_metadata(name, as_json=True)
        sess = ort.InferenceSession(str(oip_server.paths[name]), providers=["CPUExecutionProvider"])
        for ours, theirs in ((meta["inputs"], sess.get_inputs()), (meta["outputs"], sess.get_outputs())):
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in ours] == [
                (v.name, onnx_types[v.type], [d if isinstance(d, int) else -1 for d in v.shape])
                for v in theirs]
    tokens = client.get_model_metadata(TOKENS, as_json=True)
    assert [(t["name"], t["datatype"]) for t in tokens["inputs"]] == [
        ("x", "INT64"), ("h0", "FP32"), ("c0", "FP32")]
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-model")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'no-such-model'" in err.value.message()


# ---- stateless whole sequences ------------------------------------------------------


def test_stateless_infer_equals_onnxruntime(client, reference):
    rng = np.random.default_rng(0)
    x = series(rng, 3, 17)
    h0 = (0.3 * rng.normal(size=(LAYERS, 3, HIDDEN))).astype(np.float32)
    c0 = (0.3 * rng.normal(size=(LAYERS, 3, HIDDEN))).astype(np.float32)
    want = reference(LSTM, x, h0, c0)
    result = client.infer(LSTM, [infer_input("x", x), infer_input("h0", h0), infer_input("c0", c0)])
    for name in ("y", "hn", "cn"):
        got = result.as_numpy(name)
        assert got.shape == want[name].shape
        np.testing.assert_allclose(got, want[name], atol=1e-5, rtol=0)

    # zero initial state when h0/c0 are left out; only the requested output comes back
    want = reference(LSTM, x)
    result = client.infer(LSTM, [infer_input("x", x)], outputs=[triton.InferRequestedOutput("hn")])
    assert [o.name for o in result.get_response().outputs] == ["hn"]
    np.testing.assert_allclose(result.as_numpy("hn"), want["hn"], atol=1e-5, rtol=0)


def test_stateless_token_model_int32_ids(client, reference):
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 9))
    want = reference(TOKENS, ids.astype(np.int64))
    result = client.infer(TOKENS, [infer_input("x", ids.astype(np.int32))])  # INT32 -> INT64
    np.testing.assert_allclose(result.as_numpy("y"), want["y"], atol=1e-5, rtol=0)


def test_typed_contents_are_accepted(oip_server, reference):
    """Clients other than tritonclient may send typed contents instead of raw bytes."""
    x = series(np.random.default_rng(2), 1, 6)
    request = pb.ModelInferRequest(model_name=LSTM)
    tensor = request.inputs.add(name="x", datatype="FP64", shape=list(x.shape))
    tensor.contents.fp64_contents.extend(x.astype(np.float64).ravel().tolist())
    with grpc.insecure_channel(oip_server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        response = call(request)
    names = [o.name for o in response.outputs]
    y = np.frombuffer(response.raw_output_contents[names.index("y")], "<f4").reshape(
        response.outputs[names.index("y")].shape)
    np.testing.assert_allclose(y, reference(LSTM, x)["y"], atol=1e-5, rtol=0)


# ---- stateful sequences ----------------------------------------------------------------


def test_100_step_sequence_through_infer(client, reference):
    x = series(np.random.default_rng(3), 1, 100)
    want = reference(LSTM, x)["y"][0]  # (100, F)
    got = []
    for t in range(100):
        result = client.infer(LSTM, [infer_input("x", x[:, t:t + 1])], sequence_id=1001,
                              sequence_start=t == 0, sequence_end=t == 99)
        got.append(result.as_numpy("y")[0])
    got = np.concatenate(got)
    assert np.abs(got - want).max() <= TOL
    # ended: the next step without START is refused with Triton's wording
    with pytest.raises(InferenceServerException) as err:
        client.infer(LSTM, [infer_input("x", x[:, :1])], sequence_id=1001)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must specify the START flag on the first request of the sequence" in err.value.message()


def test_sequence_chunks_and_restart(client, reference):
    """A request may carry several steps; START on a live sequence begins it afresh."""
    x = series(np.random.default_rng(4), 1, 30)
    want = reference(LSTM, x)["y"][0]
    kw = dict(sequence_id="chunky")
    client.infer(LSTM, [infer_input("x", x[:, :5] + 1)], sequence_start=True, **kw)  # garbage
    first = client.infer(LSTM, [infer_input("x", x[:, :12])], sequence_start=True, **kw)
    rest = client.infer(LSTM, [infer_input("x", x[:, 12:])], sequence_end=True, **kw)
    got = np.concatenate([first.as_numpy("y")[0], rest.as_numpy("y")[0]])
    assert np.abs(got - want).max() <= TOL
    assert rest.get_response().parameters["sequence_position"].int64_param == 30


def _stream_results(client, requests):
    """Send (inputs, kwargs) on one stream; returns {request_id: result or error}."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for inputs, kwargs in requests:
            client.async_stream_infer(**kwargs, inputs=inputs)
        out = {}
        for _ in requests:
            result, error = answers.get(timeout=30)
            if error is not None:
                out[error.message()] = error
            else:
                out[result.get_response().id] = result
        return out
    finally:
        client.stop_stream()


def test_100_step_sequence_through_stream(client, reference):
    x = series(np.random.default_rng(5), 1, 100)
    want = reference(LSTM, x)["y"][0]
    requests = [([infer_input("x", x[:, t:t + 1])],
                 dict(model_name=LSTM, request_id=str(t), sequence_id="stream-seq",
                      sequence_start=t == 0, sequence_end=t == 99)) for t in range(100)]
    results = _stream_results(client, requests)
    got = np.concatenate([results[str(t)].as_numpy("y")[0] for t in range(100)])
    assert np.abs(got - want).max() <= TOL


def test_50_sequences_interleaved_on_one_stream(client, reference):
    rng = np.random.default_rng(6)
    n, steps = 50, 12
    xs = {2000 + i: series(rng, 1, steps) for i in range(n)}
    order = [sid for sid in xs for _ in range(steps)]
    random.Random(6).shuffle(order)  # each sequence's steps stay in order, sequences interleave
    taken = dict.fromkeys(xs, 0)
    requests = []
    for sid in order:
        t = taken[sid]
        taken[sid] += 1
        requests.append(([infer_input("x", xs[sid][:, t:t + 1])],
                         dict(model_name=LSTM, request_id=f"{sid}:{t}", sequence_id=sid,
                              sequence_start=t == 0, sequence_end=t == steps - 1)))
    results = _stream_results(client, requests)
    assert len(results) == n * steps
    for sid, x in xs.items():
        got = np.concatenate([results[f"{sid}:{t}"].as_numpy("y")[0] for t in range(steps)])
        assert np.abs(got - reference(LSTM, x)["y"][0]).max() <= TOL, sid


def test_token_sequence_through_stream(client, reference):
    ids = np.random.default_rng(7).integers(0, VOCAB, size=(1, 20)).astype(np.int64)
    want = reference(TOKENS, ids)["y"][0]
    requests = [([infer_input("x", ids[:, t:t + 1])],
                 dict(model_name=TOKENS, request_id=str(t), sequence_id=77,
                      sequence_start=t == 0, sequence_end=t == 19)) for t in range(20)]
    results = _stream_results(client, requests)
    got = np.concatenate([results[str(t)].as_numpy("y")[0] for t in range(20)])
    assert np.abs(got - want).max() <= TOL


# ---- errors that say what to fix ------------------------------------------------------------


def _error(call):
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value.status(), err.value.message()


def test_errors_tell_the_user_what_to_fix(client, oip_server):
    x = np.zeros((1, 1, FEATURES), np.float32)
    status, message = _error(lambda: client.infer(LSTM, [infer_input("x", x)], sequence_id=424242))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert (f"inference request for sequence 424242 to model '{LSTM}' must specify the START flag "
            "on the first request of the sequence") in message

    status, message = _error(lambda: client.infer(LSTM, [infer_input("x", x.astype(np.int64))]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert f"input 'x' of model '{LSTM}' has datatype FP32" in message and "got INT64" in message

    status, message = _error(lambda: client.infer(LSTM, [infer_input("x", np.zeros((1, 5), np.float32))]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert f"must have shape [-1, -1, {FEATURES}] (batch, time, features" in message
    assert "got [1, 5]" in message

    status, message = _error(lambda: client.infer("no-such-model", [infer_input("x", x)]))
    assert status == "StatusCode.NOT_FOUND" and "unknown model 'no-such-model'" in message

    status, message = _error(lambda: client.infer(
        LSTM, [infer_input("x", x)], sequence_id=5, outputs=[triton.InferRequestedOutput("hn")]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "cannot return output 'hn'" in message

    status, message = _error(lambda: client.infer(
        LSTM, [infer_input("x", np.zeros((2, 1, FEATURES), np.float32))], sequence_id=6,
        sequence_start=True))
    assert status == "StatusCode.INVALID_ARGUMENT" and "must have batch 1" in message

    nan = np.full((1, 1, FEATURES), np.nan, np.float32)
    status, message = _error(lambda: client.infer(LSTM, [infer_input("x", nan)], sequence_id=7,
                                                  sequence_start=True))
    assert status == "StatusCode.INVALID_ARGUMENT" and "NaN or Inf" in message

    # byte length that does not fit the declared shape: tritonclient refuses to
    # build such a request, so send it raw
    request = pb.ModelInferRequest(model_name=LSTM)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2, FEATURES])
    request.raw_input_contents.append(b"\0" * 4 * FEATURES)
    with grpc.insecure_channel(oip_server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    need = 2 * FEATURES * 4
    assert (f"input 'x': shape [1, 2, {FEATURES}] of FP32 needs {need} bytes "
            f"({2 * FEATURES} x 4), but its raw_input_contents has {need // 2} bytes") in err.value.details()


def test_bad_requests_do_not_end_the_stream(client, reference):
    x = series(np.random.default_rng(8), 1, 3)
    ok = partial(dict, model_name=LSTM, sequence_id="survivor")
    requests = [
        ([infer_input("x", x[:, :1])], ok(request_id="a", sequence_start=True)),
        ([infer_input("x", x[:, :1])], dict(model_name=LSTM, request_id="b", sequence_id=31337)),
        ([infer_input("x", x[:, 1:2].astype(np.int64))], dict(model_name=LSTM, request_id="c")),
        ([infer_input("x", x[:, :1])], dict(model_name="nope", request_id="d")),
        ([infer_input("x", x[:, 1:2])], ok(request_id="e")),
        ([infer_input("x", x[:, 2:3])], ok(request_id="f", sequence_end=True)),
    ]
    results = _stream_results(client, requests)
    errors = {k: v for k, v in results.items() if k.startswith("[request id:")}
    assert len(errors) == 3
    assert any(k.startswith("[request id: b]") and "START flag" in k for k in errors)
    assert any(k.startswith("[request id: c]") and "datatype FP32" in k for k in errors)
    assert any(k.startswith("[request id: d]") and "unknown model 'nope'" in k for k in errors)
    got = np.concatenate([results[i].as_numpy("y")[0] for i in "aef"])
    assert np.abs(got - reference(LSTM, x)["y"][0]).max() <= TOL


# ---- one session store for both protocols -----------------------------------------------


def test_sessions_hand_over_between_native_and_oip(client, oip_server, reference):
    """A sequence started on the native API continues on OIP, and the other way round."""
    from serving.client import Client

    rng = np.random.default_rng(9)
    a, b = series(rng, 1, 60), series(rng, 1, 60)
    with Client(oip_server.address) as native:
        # native Step for the first 30 steps, OIP infer (integer sequence_id) for the rest
        got_a = [native.step(LSTM, 9001, a[0, t:t + 1], start=t == 0)[0] for t in range(30)]
        for t in range(30, 60):
            result = client.infer(LSTM, [infer_input("x", a[:, t:t + 1])], sequence_id=9001,
                                  sequence_end=t == 59)
            got_a.append(result.as_numpy("y")[0])
        # OIP stream (string sequence_id) first, native StreamSteps for the rest
        requests = [([infer_input("x", b[:, t:t + 1])],
                     dict(model_name=LSTM, request_id=str(t), sequence_id="handover",
                          sequence_start=t == 0)) for t in range(30)]
        results = _stream_results(client, requests)
        got_b = [results[str(t)].as_numpy("y")[0] for t in range(30)]
        with native.stream(LSTM) as stream:
            for t in range(30, 60):
                y, position = stream.step("handover", b[0, t:t + 1], end=t == 59)
                got_b.append(y)
        assert position == 60
    # ended through the native API: OIP no longer knows it
    status, message = _error(lambda: client.infer(LSTM, [infer_input("x", b[:, :1])],
                                                  sequence_id="handover"))
    assert status == "StatusCode.INVALID_ARGUMENT" and "START flag" in message
    for x, got in ((a, got_a), (b, got_b)):
        assert np.abs(np.concatenate(got) - reference(LSTM, x)["y"][0]).max() <= TOL


def test_stream_mixes_stateless_requests_and_keeps_ids(client, reference):
    x = series(np.random.default_rng(10), 2, 7)
    requests = [([infer_input("x", x)], dict(model_name=LSTM, request_id="whole")),
                ([infer_input("x", x[:1, :3])], dict(model_name=LSTM, request_id="s0",
                                                     sequence_id=55, sequence_start=True)),
                ([infer_input("x", x[:1, 3:])], dict(model_name=LSTM, request_id="s1",
                                                     sequence_id=55, sequence_end=True))]
    results = _stream_results(client, requests)
    assert set(results) == {"whole", "s0", "s1"}
    np.testing.assert_allclose(results["whole"].as_numpy("y"), reference(LSTM, x)["y"], atol=1e-5)
    got = np.concatenate([results["s0"].as_numpy("y")[0], results["s1"].as_numpy("y")[0]])
    assert np.abs(got - reference(LSTM, x[:1])["y"][0]).max() <= TOL
    unary = client.infer(LSTM, [infer_input("x", x)], request_id="mine")
    assert unary.get_response().id == "mine"


def test_a_sequence_outlives_the_stream_that_started_it(client, oip_server, reference):
    """A client that drops its stream mid-sequence can go on later (Triton semantics)."""
    x = series(np.random.default_rng(11), 1, 4)

    def step(t, **params):
        request = pb.ModelInferRequest(model_name=LSTM, id=str(t))
        request.inputs.add(name="x", datatype="FP32", shape=[1, 1, FEATURES])
        request.raw_input_contents.append(x[:, t:t + 1].tobytes())
        request.parameters["sequence_id"].int64_param = 8080
        for key, value in params.items():
            request.parameters[key].bool_param = value
        return request

    outbox: queue.Queue = queue.Queue()
    with grpc.insecure_channel(oip_server.address) as channel:
        bidi = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     request_serializer=pb.ModelInferRequest.SerializeToString,
                                     response_deserializer=pb.ModelStreamInferResponse.FromString)
        call = bidi(iter(outbox.get, None))
        outbox.put(step(0, sequence_start=True))
        first = next(call)
        assert not first.error_message and first.infer_response.id == "0"
        outbox.put(step(1))
        second = next(call)
        call.cancel()  # the client goes away without ending the sequence
        outbox.put(None)
    rest = [client.infer(LSTM, [infer_input("x", x[:, t:t + 1])], sequence_id=8080,
                         sequence_end=t == 3).as_numpy("y")[0] for t in (2, 3)]
    ys = [np.frombuffer(r.infer_response.raw_output_contents[0], "<f4").reshape(1, FEATURES)
          for r in (first, second)]
    assert np.abs(np.concatenate(ys + rest) - reference(LSTM, x)["y"][0]).max() <= TOL
    assert client.is_server_live()


def test_bench_command_runs(oip_server, capsys):
    """The benchmark command end to end on a tiny budget (its figures are not asserted)."""
    import json

    from serving import oip_bench

    repo = str(oip_server.repo)
    assert oip_bench.main(["--repo", repo, "--model", LSTM, "--steps", "5", "--rounds", "1",
                           "--warmup", "2"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["path"] for r in rows] == list(oip_bench.PATHS)
    for r in rows:
        assert r["steps"] == 5 * oip_bench.STEPS_PER_SAMPLE.get(r["path"], 1) and r["p50_us"] > 0
    assert oip_bench.main(["--repo", repo, "--model", TOKENS]) == 2  # cannot stream float steps


def test_bidirectional_model_answers_whole_sequences_only(client, reference):
    meta = client.get_model_metadata(BIDI, as_json=True)
    assert {t["name"]: [int(d) for d in t["shape"]] for t in meta["inputs"]} == {
        "x": [-1, -1, FEATURES], "h0": [2, -1, HIDDEN]}  # 1 layer x 2 directions
    x = series(np.random.default_rng(12), 2, 9)
    result = client.infer(BIDI, [infer_input("x", x)])
    np.testing.assert_allclose(result.as_numpy("y"), reference(BIDI, x)["y"], atol=1e-5, rtol=0)
    status, message = _error(lambda: client.infer(BIDI, [infer_input("x", x[:1, :1])],
                                                  sequence_id=3, sequence_start=True))
    assert status == "StatusCode.FAILED_PRECONDITION"
    assert "cannot keep a sequence; send the whole sequence without sequence_id" in message


def test_shutting_down_is_not_ready_and_refuses_steps(client, server):
    """During a graceful stop (sessions closed) OIP says not ready and answers UNAVAILABLE."""
    x = np.zeros((1, 1, FEATURES), np.float32)
    sessions = server.server.sessions
    sessions.close()
    try:
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert not client.is_model_ready(LSTM)
        status, message = _error(lambda: client.infer(LSTM, [infer_input("x", x)], sequence_id=1,
                                                      sequence_start=True))
        assert status == "StatusCode.UNAVAILABLE" and "shutting down" in message
    finally:
        sessions.closing = False  # the module's server goes on serving the tests after this
    assert client.is_server_ready()


def test_asyncio_tritonclient_stream(oip_server, reference):
    """tritonclient.grpc.aio's stream_infer (asyncio users) gets the same answers."""
    import asyncio

    import tritonclient.grpc.aio as triton_aio

    x = series(np.random.default_rng(13), 1, 25)

    async def run():
        async def requests():
            for t in range(25):
                yield dict(model_name=LSTM, inputs=[infer_input("x", x[:, t:t + 1])],
                           request_id=str(t), sequence_id=4242, sequence_start=t == 0,
                           sequence_end=t == 24)

        out = {}
        async with triton_aio.InferenceServerClient(oip_server.address) as aio_client:
            async for result, error in aio_client.stream_infer(requests()):
                assert error is None, error
                out[result.get_response().id] = result.as_numpy("y")[0]
                if len(out) == 25:
                    break
        return out

    out = asyncio.run(run())
    got = np.concatenate([out[str(t)] for t in range(25)])
    assert np.abs(got - reference(LSTM, x)["y"][0]).max() <= TOL
