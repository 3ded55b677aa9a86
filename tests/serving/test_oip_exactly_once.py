"""Exactly-once steps through the Open Inference Protocol: the request
parameter `sequence_position` (steps the client believes the sequence has
taken) makes a retried step return its stored answer instead of advancing the
session twice, and a wrong position is ABORTED with the real one."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

MODEL, FEATURES = "lstm", 3


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.target) as c:
        yield c


def _step(client, seq, x, position, start=False):
    inp = triton.InferInput("x", [1, 1, FEATURES], "FP32")
    inp.set_data_from_numpy(x.reshape(1, 1, FEATURES))
    r = client.infer(MODEL, [inp], sequence_id=seq, sequence_start=start,
                     parameters={"sequence_position": position})
    return r.as_numpy("y")[0, -1]


def test_retry_returns_stored_answer_and_wrong_position_is_aborted(client, kit, model_repo):
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((4, FEATURES)).astype(np.float32)
    ref = kit.ort_reference(model_repo / MODEL / "1" / "model.onnx", xs[None])["y"][0]

    y0 = _step(client, 9101, xs[0], 0, start=True)
    y1 = _step(client, 9101, xs[1], 1)
    y1_retry = _step(client, 9101, xs[1], 1)  # the reply was "lost": same step again
    np.testing.assert_array_equal(y1_retry, y1)  # the stored answer, not a second step
    y2 = _step(client, 9101, xs[2], 2)
    for got, want in zip([y0, y1, y2], ref[:3]):
        assert np.abs(got - want).max() <= 1e-4

    with pytest.raises(InferenceServerException) as err:
        _step(client, 9101, xs[3], 7)
    assert "ABORTED" in str(err.value.status()) and "3" in err.value.message()
    # the refused step changed nothing: the right position continues exactly
    y3 = _step(client, 9101, xs[3], 3)
    assert np.abs(y3 - ref[3]).max() <= 1e-4


def test_non_integer_position_is_refused(client):
    inp = triton.InferInput("x", [1, 1, FEATURES], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, FEATURES), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [inp], sequence_id=9102, sequence_start=True,
                     parameters={"sequence_position": "zero"})
    assert "sequence_position" in err.value.message()
