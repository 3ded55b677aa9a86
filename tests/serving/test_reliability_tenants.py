"""Tenants: bearer tokens, per-tenant sessions through both protocols, quota, reload."""
import json
import os
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.client import Client

MODEL, F = "lstm", 3
QUOTA = 6


@pytest.fixture(scope="module")
def tenants(model_repo, kit, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "alpha", "tok-b": "beta"}))
    running = kit.start_server(repo=str(model_repo), auth_tokens=str(tokens),
                               max_sessions_per_tenant=QUOTA)
    yield running, tokens
    running.stop()


def _ref(model_repo, kit, x):
    return kit.ort_reference(model_repo / MODEL / "1" / "model.onnx", x[None])["y"][0]


def test_missing_or_bad_token_is_unauthenticated_but_health_is_open(tenants):
    running, _ = tenants
    for token in (None, "nope"):
        with Client(running.target, token=token) as c:
            for call in (lambda: c.list_models(),
                         lambda: c.step(MODEL, 1, [0.1, 0.2, 0.3], start=True)):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:  # a stream is refused too
                with c.stream(MODEL) as s:
                    s.step(1, [0.1, 0.2, 0.3], start=True)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(running.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    with triton.InferenceServerClient(running.target) as oip:
        assert oip.is_server_live() and oip.is_server_ready()  # open: orchestrator probes
        x = np.zeros((1, 1, F), np.float32)
        inp = triton.InferInput("x", [1, 1, F], "FP32")
        inp.set_data_from_numpy(x)
        for headers in (None, {"authorization": "Bearer nope"}):
            with pytest.raises(InferenceServerException) as err:
                oip.infer(MODEL, [inp], sequence_id=5, sequence_start=True, headers=headers)
            assert "UNAUTHENTICATED" in str(err.value.status())


def test_colliding_sequence_ids_are_separate_sessions_native(tenants, model_repo, kit):
    running, _ = tenants
    rng = np.random.default_rng(3)
    xa, xb = rng.normal(size=(2, 20, F)).astype(np.float32)
    with Client(running.target, token="tok-a") as a, Client(running.target, token="tok-b") as b:
        ya, yb = [], []
        for t in range(20):  # interleaved, same id
            ya.append(a.step(MODEL, 42, xa[t], start=t == 0)[0][0])
            yb.append(b.step(MODEL, 42, xb[t], start=t == 0)[0][0])
        np.testing.assert_allclose(ya, _ref(model_repo, kit, xa), atol=1e-4)
        np.testing.assert_allclose(yb, _ref(model_repo, kit, xb), atol=1e-4)
        assert a.end_session(MODEL, 42) == 20 and b.end_session(MODEL, 42) == 20


def _refusals(client, sid):
    """The status and message of every way to touch session `sid` without owning it."""
    out = []
    for call in (lambda: client.step(MODEL, sid, [0.0] * F),
                 lambda: client.rollout(MODEL, sid, steps=2),
                 lambda: client.end_session(MODEL, sid),
                 lambda: client.step(MODEL, sid, [0.0] * F, expected_position=3)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        out.append((err.value.code(), err.value.details()))
    return out


def test_a_tenant_cannot_read_step_end_or_detect_another_tenants_session(tenants):
    running, _ = tenants
    with Client(running.target, token="tok-a") as a, Client(running.target, token="tok-b") as b:
        a.step(MODEL, "secret", [0.5] * F, start=True)
        while_alive = _refusals(b, "secret")
        assert a.end_session(MODEL, "secret") == 1  # b's attempts did not end or step it
        after_end = _refusals(b, "secret")
        assert while_alive == after_end  # indistinguishable from a session nobody has
        assert all(code == grpc.StatusCode.INVALID_ARGUMENT for code, _ in while_alive)


def test_colliding_sequence_ids_through_oip_with_headers(tenants, model_repo, kit):
    running, _ = tenants
    rng = np.random.default_rng(4)
    xs = {"tok-a": rng.normal(size=(10, F)).astype(np.float32),
          "tok-b": rng.normal(size=(10, F)).astype(np.float32)}
    got = {k: [] for k in xs}
    with triton.InferenceServerClient(running.target) as oip:
        for t in range(10):
            for token, x in xs.items():
                inp = triton.InferInput("x", [1, 1, F], "FP32")
                inp.set_data_from_numpy(x[t][None, None])
                r = oip.infer(MODEL, [inp], sequence_id=77, sequence_start=t == 0,
                              headers={"authorization": f"Bearer {token}"})
                got[token].append(r.as_numpy("y")[0, -1])
        # the native API sees the same per-tenant session (position 10 each)
        with Client(running.target, token="tok-a") as a:
            assert a.end_session(MODEL, 77) == 10
        with pytest.raises(InferenceServerException):  # a's session is gone, b's is not
            inp = triton.InferInput("x", [1, 1, F], "FP32")
            inp.set_data_from_numpy(xs["tok-a"][0][None, None])
            oip.infer(MODEL, [inp], sequence_id=77, headers={"authorization": "Bearer tok-a"})
    for token, x in xs.items():
        np.testing.assert_allclose(got[token], _ref(model_repo, kit, x), atol=1e-4)
    with Client(running.target, token="tok-b") as b:
        assert b.end_session(MODEL, 77) == 10


def test_per_tenant_quota(tenants):
    running, _ = tenants
    with Client(running.target, token="tok-a") as a, Client(running.target, token="tok-b") as b:
        for i in range(QUOTA):
            b.step(MODEL, f"q{i}", [0.1] * F, start=True)
        with pytest.raises(grpc.RpcError) as err:
            b.step(MODEL, "one-too-many", [0.1] * F, start=True)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota" in err.value.details()
        a.step(MODEL, "q0", [0.1] * F, start=True)  # another tenant is not affected
        a.end_session(MODEL, "q0")
        b.end_session(MODEL, "q0")  # ending frees quota
        b.step(MODEL, "now-fits", [0.1] * F, start=True)
        for sid in ["now-fits"] + [f"q{i}" for i in range(1, QUOTA)]:
            b.end_session(MODEL, sid)


def test_token_file_is_reloaded_without_restart(tenants):
    running, tokens = tenants
    old = tokens.read_text()
    try:
        tokens.write_text(json.dumps({"tok-a": "alpha", "tok-c": "gamma"}))
        st = os.stat(tokens)
        os.utime(tokens, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        time.sleep(1.2)  # the file is checked at most once a second
        with Client(running.target, token="tok-c") as c:
            assert c.list_models()
        with Client(running.target, token="tok-b") as b:
            with pytest.raises(grpc.RpcError) as err:
                b.list_models()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        tokens.write_text(old)
        st = os.stat(tokens)
        os.utime(tokens, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
