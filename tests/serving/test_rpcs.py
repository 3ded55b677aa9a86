"""Every RPC of seqserve.v1.Inference against a real server, and bad input."""
import grpc
import numpy as np
import pytest

from protos.seqserve.v1 import inference_pb2 as pb
from serving.client import Client, tensor


@pytest.fixture(scope="module")
def client(server):
    c = Client(server.target)
    yield c
    c.close()


def test_list_models_and_metadata(client):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"lstm", "gru", "rnn", "lm", "bi", "tagger"}
    assert models["lstm"].can_stream and not models["bi"].can_stream
    meta = client.metadata("lstm")
    assert (meta.cell, meta.layers, meta.hidden, meta.input_features) == ("lstm", 2, 16, 3)
    assert meta.ort_provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert meta.cell_device in ("cpu", "cuda")
    lm = client.metadata("lm")
    assert lm.accepts_text and list(lm.vocab)[:2] == ["<pad>", "<unk>"]


@pytest.mark.parametrize("name", ["lstm", "gru", "bi"])
def test_predict_matches_onnxruntime_with_initial_state(client, model_repo, kit, name):
    rng = np.random.default_rng(1)
    meta = client.metadata(name)
    x = rng.standard_normal((4, 9, 3)).astype(np.float32)
    h0 = rng.standard_normal((meta.layers * meta.directions, 4, meta.hidden)).astype(np.float32)
    c0 = h0 * 0.5 if meta.cell == "lstm" else None
    got = client.predict(name, x, h0, c0)
    want = kit.ort_reference(model_repo / name / "1/model.onnx", x, h0, c0)
    for k in want:
        assert np.abs(got[k] - want[k]).max() < 1e-5, k


def test_predict_text_rows_equal_token_ids(client, model_repo, kit):
    vocab = kit.VOCAB
    got = client.predict("lm", text=["The cat sat on the mat.", "a dog ran"])
    assert list(got["lengths"]) == [7, 3]
    ids = np.array([[vocab.index(w) for w in ["the", "cat", "sat", "on", "the", "mat", "."]]])
    want = kit.ort_reference(model_repo / "lm/1/model.onnx", ids)
    assert np.abs(got["y"][0] - want["y"][0]).max() < 1e-5


def test_step_chunk_then_single_steps_match_one_ort_call(client, model_repo, kit):
    x = np.random.default_rng(2).standard_normal((12, 3)).astype(np.float32)
    y1, p1 = client.step("gru", "chunky", x[:5], start=True)
    y2, p2 = client.step("gru", "chunky", x[5:6])
    y3, p3 = client.step("gru", "chunky", x[6:], end=True)
    assert (p1, p2, p3) == (5, 6, 12)
    want = kit.ort_reference(model_repo / "gru/1/model.onnx", x[None])["y"][0]
    assert np.abs(np.concatenate([y1, y2, y3]) - want).max() < 1e-4


def _ort_closed_loop(path, x_prefix, steps, kit):
    """Reference rollout: ORT on the prefix, then ORT one step at a time feeding y back."""
    out = kit.ort_reference(path, x_prefix[None])
    h, c = out["hn"], out.get("cn")
    x = out["y"][:, -1:]  # (1, 1, F)
    ys = []
    for _ in range(steps):
        o = kit.ort_reference(path, x, h, c)
        h, c = o["hn"], o.get("cn")
        ys.append(o["y"][0, 0])
        x = o["y"]
    return np.array(ys)


def test_rollout_matches_closed_loop_reference_and_commit(client, model_repo, kit):
    x = np.random.default_rng(3).standard_normal((6, 3)).astype(np.float32)
    client.step("lstm", 77, x, start=True)
    y, pos = client.rollout("lstm", 77, steps=20)
    assert pos == 6  # not committed: the session is untouched
    want = _ort_closed_loop(model_repo / "lstm/1/model.onnx", x, 20, kit)
    assert np.abs(y - want).max() < 1e-4
    y_again, _ = client.rollout("lstm", 77, steps=20)
    np.testing.assert_array_equal(y, y_again)
    y_commit, pos = client.rollout("lstm", 77, steps=20, commit=True)
    assert pos == 26
    np.testing.assert_array_equal(y, y_commit)
    y_next, _ = client.rollout("lstm", 77, steps=1)
    assert not np.allclose(y_next[0], y[0])  # the committed session moved on
    assert client.end_session("lstm", 77) == 26


def test_end_session_and_unknown_session(client):
    client.step("rnn", 5, [0.0, 1.0, 2.0], start=True)
    assert client.end_session("rnn", 5) == 1
    with pytest.raises(grpc.RpcError) as e:
        client.step("rnn", 5, [0.0, 1.0, 2.0])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "start" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.end_session("rnn", 5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


BAD = [  # (what, request, code, words the message must hold)
    ("unknown model", dict(model="nope", x=tensor(np.zeros(3, np.float32))), "NOT_FOUND", "nope"),
    ("wrong version", dict(model="lstm", version=9, x=tensor(np.zeros(3, np.float32))), "NOT_FOUND", "version 9"),
    ("wrong dtype", dict(model="lstm", x=tensor(np.zeros(3, np.int64))), "INVALID_ARGUMENT", "float32"),
    ("wrong rank", dict(model="lstm", x=tensor(np.zeros((1, 2, 3), np.float32))), "INVALID_ARGUMENT", "shape"),
    ("wrong features", dict(model="lstm", x=tensor(np.zeros((2, 4), np.float32))), "INVALID_ARGUMENT", "features"),
    ("empty", dict(model="lstm", x=tensor(np.zeros((0, 3), np.float32))), "INVALID_ARGUMENT", "empty"),
    ("nan", dict(model="lstm", x=tensor(np.array([0, np.nan, 0], np.float32))), "INVALID_ARGUMENT", "NaN"),
    ("inf", dict(model="lstm", x=tensor(np.array([0, np.inf, 0], np.float32))), "INVALID_ARGUMENT", "Inf"),
    ("too many steps", dict(model="lstm", x=tensor(np.zeros((600, 3), np.float32))), "INVALID_ARGUMENT", "at most 512"),
    ("shape mismatch", dict(model="lstm", x=pb.Tensor(shape=[2, 3], float_data=[1, 2])), "INVALID_ARGUMENT", "needs 6 values"),
    ("token out of range", dict(model="lm", x=tensor(np.array([99]))), "INVALID_ARGUMENT", "vocabulary"),
    ("no x", dict(model="lstm"), "INVALID_ARGUMENT", "needs x"),
    ("cannot stream", dict(model="bi", x=tensor(np.zeros(3, np.float32))), "FAILED_PRECONDITION", "Predict"),
]


@pytest.mark.parametrize("what,fields,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_step_is_refused_with_a_clear_message_and_touches_no_session(
        client, model_repo, kit, what, fields, code, words):
    x = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
    y0, _ = client.step("lstm", "bystander", x[:2], start=True)
    req = pb.StepRequest(sequence_key="bystander", start=False, **fields)
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Step(req)
    assert e.value.code().name == code
    assert words in e.value.details()
    y1, pos = client.step("lstm", "bystander", x[2:])
    assert pos == 4  # the bad request did not advance it
    want = kit.ort_reference(model_repo / "lstm/1/model.onnx", x[None])["y"][0]
    assert np.abs(np.concatenate([y0, y1]) - want).max() < 1e-4


def test_bad_predict_inputs(client):
    with pytest.raises(grpc.RpcError) as e:
        client.predict("gru", np.zeros((2, 3, 3), np.float32), h0=np.zeros((2, 5, 16), np.float32))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "h0" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.predict("gru", np.zeros((2, 3), np.float32))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.predict("lstm", text=["hello"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text" in e.value.details()


def test_stream_bad_step_amid_good_ones_keeps_the_stream(client, model_repo, kit):
    from serving.client import step_request

    x = np.random.default_rng(5).standard_normal((3, 3)).astype(np.float32)
    with client.stream("lstm") as s:
        results = s.send([
            step_request("lstm", "good-a", x[0], start=True),
            step_request("lstm", "never-started", x[0]),
            step_request("lstm", "good-b", x[0], start=True),
            step_request("nope", "good-a", x[0]),
            step_request("lstm", "good-b", np.array([1.0, np.nan, 0.0], np.float32)),
        ])
        codes = [r.code for r in results]
        assert codes[0] == 0 and codes[2] == 0
        assert codes[1] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "start" in results[1].error
        assert codes[3] == grpc.StatusCode.NOT_FOUND.value[0]
        assert codes[4] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "NaN" in results[4].error
        ya = [kit.array(results[0].y)[0]]
        for t in (1, 2):
            y, _ = s.step("good-a", x[t])
            ya.append(y[0])
    want = kit.ort_reference(model_repo / "lstm/1/model.onnx", x[None])["y"][0]
    assert np.abs(np.array(ya) - want).max() < 1e-4


def test_multiplexed_message_with_bad_rows(client, model_repo, kit):
    """The one-call path for a message of many sessions refuses rows one by one."""
    from serving.client import step_request

    x = np.random.default_rng(6).standard_normal((2, 3)).astype(np.float32)
    with client.stream("gru") as s:
        res = s.send([
            step_request("gru", "mx-1", x[0], start=True),
            step_request("gru", "mx-2", np.array([np.inf, 0, 0], np.float32), start=True),
            step_request("gru", "mx-unknown", x[0]),
            step_request("gru", "mx-1", x[1]),
            step_request("gru", "mx-3", x[0], start=True, end=True),
        ])
        assert [r.code == 0 for r in res] == [True, False, False, False, True]
        assert "NaN or Inf" in res[1].error and "start" in res[2].error
        assert "twice" in res[3].error
        y2, pos = s.step("mx-1", x[1])
        assert pos == 2
        with pytest.raises(Exception):
            s.step("mx-3", x[0])  # ended by its own step
    want = kit.ort_reference(model_repo / "gru/1/model.onnx", x[None])["y"][0]
    assert np.abs(np.concatenate([kit.array(res[0].y), y2]) - want).max() < 1e-4


def test_packed_session_batch_matches_ort_and_refuses_rows_one_by_one(client, model_repo, kit):
    xs = np.random.default_rng(7).standard_normal((6, 4, 3)).astype(np.float32)  # (B, T, F)
    ids = [5001, 5002, 5003, 5004, 5005, 5006]
    got = np.zeros((6, 4, 3), np.float32)
    with client.stream("lstm") as s:
        for t in range(4):
            y, pos, errs = s.send_batch(ids, xs[:, t], start=[t == 0] * 6)
            assert not errs and list(pos) == [t + 1] * 6
            got[:, t] = y
        bad = xs[:, 0].copy()
        bad[2, 1] = np.nan
        y, pos, errs = s.send_batch(ids[:3] + [9999], np.concatenate([bad[:3], bad[3:4]]))
        assert set(errs) == {2, 3} and "NaN" in str(errs[2]) and "start" in str(errs[3])
        assert list(pos[:2]) == [5, 5] and pos[2] == 0
        _, _, errs = s.send_batch(ids[:2], np.zeros((2, 4), np.float32))  # wrong features
        assert set(errs) == {0, 1} and "shape" in str(errs[0])
    want = kit.ort_reference(model_repo / "lstm/1/model.onnx", xs)["y"]
    assert np.abs(got - want).max() < 1e-4


def test_stream_hot_path_follows_sessions_through_bad_steps_and_interleaving(client, model_repo, kit):
    """One stream sends the same plain step over and over (the stream checks
    the step it sent last before any lookup), two sessions interleaved, a NaN
    step and an unknown session in between: every good step matches ONNX
    Runtime, and the bad ones are refused with their own message."""
    from serving.client import StepError

    x = np.random.default_rng(8).standard_normal((2, 12, 3)).astype(np.float32)
    ys = {0: [], 1: []}
    with client.stream("lstm") as s:
        for b in (0, 1):
            y, _ = s.step(f"hot-{b}", x[b, 0], start=True)
            ys[b].append(y[0])
        for t in range(1, 12):
            for b in ((0,) if t < 6 else (0, 1)):  # session 0 alone, then both taking turns
                y, pos = s.step(f"hot-{b}", x[b, len(ys[b])])
                ys[b].append(y[0])
                assert pos == len(ys[b])
            if t == 3:
                with pytest.raises(StepError, match="NaN"):
                    s.step("hot-0", np.array([np.nan, 0.0, 0.0], np.float32))
                with pytest.raises(StepError, match="start"):
                    s.step("hot-never", x[0, 0])
    for b in (0, 1):
        n = len(ys[b])
        want = kit.ort_reference(model_repo / "lstm/1/model.onnx", x[b:b + 1, :n])["y"][0]
        assert np.abs(np.array(ys[b]) - want).max() < 1e-4
