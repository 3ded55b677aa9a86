"""A Python client for seqserve.v1.Inference (blocking; numpy in, numpy out).

    from serving.client import Client
    with Client("127.0.0.1:50051") as c:
        c.predict("sine-lstm", x)["y"]                 # x (B, T, F)
        y, position = c.step("sine-lstm", 42, [0.3], start=True)
        with c.stream("sine-lstm") as s:               # one bidi stream, step by step
            y, position = s.step(42, [0.31])
        c.rollout("sine-lstm", 42, steps=100)
        c.end_session("sine-lstm", 42)

Failed calls raise grpc.RpcError (`.code()`, `.details()`); inside a stream a
failed step raises StepError and the stream stays usable.

Security: `Client(target, token="...")` sends `authorization: Bearer TOKEN`;
`tls_ca=` (PEM file of the CA that signed the server) switches to TLS, and
`tls_cert=`/`tls_key=` add a client certificate for mutual TLS.

Exactly-once: pass `expected_position=` (steps the session has taken before
this one). Retrying after a lost reply returns the stored answer; an ABORTED
error means the session is elsewhere: `position_of(err)` says where.
"""
from __future__ import annotations

import queue
import threading

import grpc
import numpy as np

from protos.seqserve.v1 import inference_pb2 as pb
from protos.seqserve.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
POSITION_METADATA = "seqserve-position"


def position_of(err: grpc.RpcError) -> int | None:
    """The session's actual position carried by an ABORTED step, else None."""
    for key, value in (err.trailing_metadata() or ()):
        if key == POSITION_METADATA:
            return int(value)
    return None


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def make_channel(target: str, *, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, server_name: str | None = None,
                 options: list | None = None) -> grpc.Channel:
    """Plain channel, or TLS when any TLS file is given (mutual with cert + key)."""
    options = list(options or [])
    if not (tls_ca or tls_cert or tls_key):
        return grpc.insecure_channel(target, options=options)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    creds = grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=options)


def auth_metadata(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


class StepError(RuntimeError):
    """A step refused inside a stream: `code` (grpc.StatusCode) and message;
    `position`: the session's actual position when code is ABORTED."""

    def __init__(self, code: int, message: str, position: int | None = None):
        self.code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        self.position = position
        super().__init__(f"{self.code.name}: {message}")


def tensor(x, dtype=None) -> pb.Tensor:
    a = np.asarray(x, dtype=dtype)
    if a.dtype.kind in "iu":
        return pb.Tensor(shape=a.shape, int64_data=a.ravel().tolist())
    return pb.Tensor(shape=a.shape, float_data=a.astype(np.float32).ravel().tolist())


def array(t: pb.Tensor) -> np.ndarray:
    if len(t.int64_data):
        return np.array(t.int64_data, np.int64).reshape(tuple(t.shape))
    return np.array(t.float_data, np.float32).reshape(tuple(t.shape))


def _set_sequence(msg, sequence_id) -> None:
    if isinstance(sequence_id, str):
        msg.sequence_key = sequence_id
    else:
        msg.sequence_id = int(sequence_id)


def step_request(model: str, sequence_id, x=None, *, start=False, end=False, text: str = "",
                 version: int = 0, expected_position: int | None = None) -> pb.StepRequest:
    msg = pb.StepRequest(model=model, version=version, start=start, end=end, text=text)
    if expected_position is not None:
        msg.expected_position = int(expected_position)
    _set_sequence(msg, sequence_id)
    if x is not None:
        msg.x.CopyFrom(tensor(x))
    return msg


class StepStream:
    """One StreamSteps call driven step by step from blocking code."""

    def __init__(self, stub: pb_grpc.InferenceStub, model: str, timeout: float | None = None,
                 metadata: tuple = ()):
        self.model = model
        self._requests: queue.Queue = queue.Queue()
        self._replies = stub.StreamSteps(iter(self._requests.get, None), timeout=timeout,
                                         metadata=metadata or None)
        self._lock = threading.Lock()

    def send(self, steps: list[pb.StepRequest]) -> list[pb.StepResponse]:
        """Send one message carrying `steps` (any sessions); returns their results."""
        with self._lock:
            self._requests.put(pb.StreamStepsRequest(steps=steps))
            return list(next(self._replies).results)

    def send_batch(self, sequence_ids: list, x, *, start=None, end=None, expected_positions=None):
        """One step for each of B sessions in the packed form (one cell call).

        x: (B, F) float32 or (B,) int64. Returns (y (B, out), positions (B,),
        errors): errors maps a refused row's index to its StepError (a
        position mismatch's row position is the session's actual position).
        """
        b = pb.SessionBatch(model=self.model, x=tensor(x), start=start or [], end=end or [],
                            expected_positions=[] if expected_positions is None
                            else [int(e) for e in expected_positions])
        if sequence_ids and isinstance(sequence_ids[0], str):
            b.sequence_keys.extend(sequence_ids)
        else:
            b.sequence_ids.extend(int(i) for i in sequence_ids)
        with self._lock:
            self._requests.put(pb.StreamStepsRequest(batch=b))
            r = next(self._replies).batch
        y = array(r.y) if r.y.shape else np.zeros((0, 0), np.float32)
        errors = {i: StepError(c, m, r.positions[i] if i < len(r.positions) else None)
                  for i, (c, m) in enumerate(zip(r.codes, r.errors)) if c}
        return y, np.array(r.positions, np.int64), errors

    def step(self, sequence_id, x=None, *, start=False, end=False, text: str = "",
             expected_position: int | None = None):
        """-> (y (T, out), position); raises StepError if the server refused it."""
        (r,) = self.send([step_request(self.model, sequence_id, x, start=start, end=end, text=text,
                                       expected_position=expected_position)])
        if r.code:
            raise StepError(r.code, r.error, r.position)
        return array(r.y), r.position

    def close(self) -> None:
        self._requests.put(None)
        for _ in self._replies:  # drain so the call completes cleanly
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client:
    def __init__(self, target: str = DEFAULT_TARGET, timeout: float | None = 30.0,
                 channel: grpc.Channel | None = None, *, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, server_name: str | None = None):
        self.channel = channel or make_channel(target, tls_ca=tls_ca, tls_cert=tls_cert,
                                               tls_key=tls_key, server_name=server_name)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.timeout = timeout
        self.auth = auth_metadata(token)  # call metadata sent with every RPC
        self._kw = {"metadata": self.auth or None}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server's health check says SERVING."""
        import time

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def list_models(self) -> list[pb.ModelSummary]:
        r = self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, **self._kw)
        return list(r.models)

    def metadata(self, model: str, version: int = 0) -> pb.ModelMetadataResponse:
        return self.stub.ModelMetadata(pb.ModelMetadataRequest(model=model, version=version),
                                       timeout=self.timeout, **self._kw)

    def predict(self, model: str, x=None, h0=None, c0=None, *, text: list[str] | None = None,
                version: int = 0) -> dict[str, np.ndarray]:
        """Whole sequences: x (B, T, F) or (B, T) ids, or text -> {"y", "hn", "cn"?, "lengths"?}."""
        req = pb.PredictRequest(model=model, version=version, text=text or [])
        if x is not None:
            req.x.CopyFrom(tensor(x))
        if h0 is not None:
            req.h0.CopyFrom(tensor(h0, np.float32))
        if c0 is not None:
            req.c0.CopyFrom(tensor(c0, np.float32))
        r = self.stub.Predict(req, timeout=self.timeout, **self._kw)
        out = {"y": array(r.y), "hn": array(r.hn)}
        if r.HasField("cn"):
            out["cn"] = array(r.cn)
        if r.lengths:
            out["lengths"] = np.array(r.lengths)
        return out

    def step(self, model: str, sequence_id, x=None, *, start=False, end=False, text: str = "",
             version: int = 0, expected_position: int | None = None, timeout=None):
        """One session's next step(s): -> (y (T, out), position).

        expected_position: see the module doc; ABORTED -> position_of(err).
        """
        r = self.stub.Step(step_request(model, sequence_id, x, start=start, end=end, text=text,
                                        version=version, expected_position=expected_position),
                           timeout=self.timeout if timeout is None else timeout, **self._kw)
        return array(r.y), r.position

    def stream(self, model: str) -> StepStream:
        return StepStream(self.stub, model, metadata=self.auth)

    def rollout(self, model: str, sequence_id, steps: int, x=None, *, commit: bool = False,
                temperature: float = 0.0, top_k: int = 0, seed: int = 0, tokens: bool = False):
        """Closed loop: -> (y (steps, out), position)[, tokens].

        Language models: temperature 0 feeds back each step's argmax; > 0
        samples (among the top_k most probable, if set; repeatable with a
        seed). tokens=True also returns the token ids read at each step.
        """
        req = pb.RolloutRequest(model=model, steps=steps, commit=commit, temperature=temperature,
                                top_k=top_k, seed=seed)
        _set_sequence(req, sequence_id)
        if x is not None:
            req.x.CopyFrom(tensor(x))
        r = self.stub.Rollout(req, timeout=self.timeout, **self._kw)
        return (array(r.y), r.position, list(r.tokens)) if tokens else (array(r.y), r.position)

    def end_session(self, model: str, sequence_id) -> int:
        req = pb.EndSessionRequest(model=model)
        _set_sequence(req, sequence_id)
        return self.stub.EndSession(req, timeout=self.timeout, **self._kw).position
