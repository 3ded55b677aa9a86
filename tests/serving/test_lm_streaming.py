"""A language model served token by token (issue 9): the top-k next words
after each streamed word equal what Predict (ONNX Runtime on the whole
prefix) gives, and a greedy Rollout continues a prompt exactly as feeding
ONNX Runtime its own argmax would."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from serving.client import Client

SENTENCE = ["the", "cat", "sat", "on", "the", "mat", ".", "a", "dog", "ran"]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target) as c:
        yield c


def test_streamed_top_k_equals_whole_prefix_predict(client, kit, model_repo):
    ids = [kit.VOCAB.index(w) for w in SENTENCE]
    k = 5
    for t, word in enumerate(SENTENCE):
        y, position = client.step("lm", "lm-typing", text=word, start=(t == 0))
        assert position == t + 1
        p_stream = softmax(y[-1].astype(np.float64))
        # independent reference: ONNX Runtime on the whole prefix, outside the server
        ref = kit.ort_reference(model_repo / "lm" / "1" / "model.onnx",
                                np.array([ids[: t + 1]], np.int64))["y"][0, -1]
        p_ref = softmax(ref.astype(np.float64))
        top_stream = np.argsort(-p_stream, kind="stable")[:k]
        top_ref = np.argsort(-p_ref, kind="stable")[:k]
        assert list(top_stream) == list(top_ref), f"after {SENTENCE[: t + 1]}"
        assert np.abs(p_stream[top_stream] - p_ref[top_ref]).max() <= 1e-4
        # and the server's own whole-prefix Predict agrees too
        whole = client.predict("lm", text=[" ".join(SENTENCE[: t + 1])])["y"][0]
        assert np.abs(softmax(whole[t].astype(np.float64)) - p_stream).max() <= 1e-4
    client.end_session("lm", "lm-typing")


def test_greedy_rollout_continues_a_prompt(client, kit, model_repo):
    prompt = [kit.VOCAB.index(w) for w in ["a", "dog"]]
    client.step("lm", "lm-rollout", np.array(prompt, np.int64), start=True)
    steps = 6
    y, position = client.rollout("lm", "lm-rollout", steps)
    assert y.shape == (steps, len(kit.VOCAB)) and position == len(prompt)  # untouched
    # reference: feed ONNX Runtime its own argmax, one whole-prefix call per word
    path = model_repo / "lm" / "1" / "model.onnx"
    seq = list(prompt)
    seq.append(int(np.argmax(kit.ort_reference(path, np.array([seq], np.int64))["y"][0, -1])))
    for t in range(steps):
        ref = kit.ort_reference(path, np.array([seq], np.int64))["y"][0, -1]
        assert np.abs(y[t] - ref).max() <= 1e-4
        assert int(np.argmax(y[t])) == int(np.argmax(ref))
        seq.append(int(np.argmax(ref)))
    client.end_session("lm", "lm-rollout")


def test_sampled_rollout_reads_the_tokens_it_reports_and_repeats_with_a_seed(client, kit, model_repo):
    """Sampling: y[t] is ONNX Runtime's output after the prompt plus tokens[:t+1];
    a seed repeats the continuation; top_k=1 is greedy; bad settings are refused."""
    prompt = [kit.VOCAB.index(w) for w in ["the", "cat"]]
    client.step("lm", "lm-sample", np.array(prompt, np.int64), start=True)
    steps = 8
    y, position, tokens = client.rollout("lm", "lm-sample", steps, temperature=1.5, seed=11, tokens=True)
    assert position == len(prompt) and len(tokens) == steps and 0 not in tokens  # never <pad>
    path = model_repo / "lm" / "1" / "model.onnx"
    ref = kit.ort_reference(path, np.array([prompt + tokens], np.int64))["y"][0]  # one whole call
    assert np.abs(y - ref[len(prompt):]).max() <= 1e-4
    again = client.rollout("lm", "lm-sample", steps, temperature=1.5, seed=11, tokens=True)
    assert again[2] == tokens
    others = {tuple(client.rollout("lm", "lm-sample", steps, temperature=1.5, seed=s, tokens=True)[2])
              for s in range(12, 17)}
    assert len(others | {tuple(tokens)}) > 1  # the seed matters
    greedy = client.rollout("lm", "lm-sample", steps, tokens=True)
    assert client.rollout("lm", "lm-sample", steps, temperature=0.7, top_k=1, seed=3, tokens=True)[2] == greedy[2]
    for bad, message in (({"temperature": -1.0}, "temperature must be >= 0"),
                         ({"top_k": 5}, "set temperature > 0"),
                         ({"temperature": 1.0, "top_k": -2}, "top_k must be >= 0")):
        with pytest.raises(grpc.RpcError) as err:
            client.rollout("lm", "lm-sample", steps, **bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    client.step("lstm", "no-tokens", np.ones(3, np.float32), start=True)
    with pytest.raises(grpc.RpcError) as err:  # a forecaster has no tokens to choose
        client.rollout("lstm", "no-tokens", 2, temperature=1.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "language model" in err.value.details()
    client.end_session("lm", "lm-sample")
