"""Fuzz: 10,000+ malformed requests against a live server, both protocols.

A seeded generator (reproducible; FUZZ_SEED / FUZZ_COUNT to vary) sends
random bytes on every method path (identity serializers), and well-formed
messages with wrong shapes and datatypes, huge and negative dimensions,
NaN/Inf, unknown models, versions, parameters and flags. Every reply must
be OK or a proper status (never UNKNOWN; INTERNAL only for bytes that are
not a message at all), the server must keep serving, and a well-behaved
session streaming alongside must get exactly the ONNX Runtime answers.
"""
import asyncio
import collections
import os
import random
import struct

import grpc
import numpy as np
import pytest

from protos.inference import messages as oip
from protos.seqserve.v1 import inference_pb2 as pb

COUNT = int(os.environ.get("FUZZ_COUNT", "10000"))
SEED = int(os.environ.get("FUZZ_SEED", "20261122"))
CONCURRENCY = 24
NATIVE = "/seqserve.v1.Inference/"
OIP = "/inference.GRPCInferenceService/"
UNARY = [NATIVE + m for m in ("ListModels", "ModelMetadata", "Predict", "Step", "Rollout",
                              "EndSession")] + \
        [OIP + m for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                           "ModelMetadata", "ModelInfer")]
STREAMS = [NATIVE + "StreamSteps", OIP + "ModelStreamInfer"]
MODELS = ["lstm", "gru", "rnn", "lm", "bi", "nope", "", "lstm\x00", "ü" * 300]
DIMS = [-(2**63), -1, 0, 1, 2, 3, 7, 12, 2**31, 2**40, 2**62]
FLOATS = [0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 3.4e38, 1e-45]
DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "",
             "fp32", "garbage"]


@pytest.fixture(scope="module")
def fuzz_server(model_repo, kit):
    running = kit.start_server(repo=str(model_repo), max_sessions=2000, max_steps_per_request=64,
                               max_message_bytes=1 << 20, session_idle_s=300)
    yield running
    running.stop()


class Gen:
    """Seeded generators of malformed requests: (method path, [serialized messages])."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def pick(self, xs):
        return self.r.choice(xs)

    def floats(self, n):
        r = self.r
        return [r.choice(FLOATS) if r.random() < 0.2 else r.gauss(0, 1) for _ in range(n)]

    def tensor(self) -> pb.Tensor:
        r = self.r
        t = pb.Tensor(shape=[self.pick(DIMS) for _ in range(r.randint(0, 4))])
        if r.random() < 0.7:
            t.float_data.extend(self.floats(r.choice([0, 1, 2, 3, 6, 9, 17])))
        if r.random() < 0.3:
            t.int64_data.extend(r.choice([-1, 0, 3, 11, 12, 2**40]) for _ in range(r.randint(0, 5)))
        return t

    def seq(self, msg):
        r = self.r
        if r.random() < 0.5:
            msg.sequence_id = r.choice([0, 1, 2, 42, 2**64 - 1, r.getrandbits(64)])
        elif r.random() < 0.8:
            msg.sequence_key = r.choice(["", "a", "s" * 1000, "\u2603", str(r.random())])

    def step(self) -> pb.StepRequest:
        r = self.r
        s = pb.StepRequest(model=self.pick(MODELS), version=self.pick([0, 0, 1, 2, -1, 2**62]),
                           start=r.random() < 0.5, end=r.random() < 0.2)
        self.seq(s)
        if r.random() < 0.85:
            s.x.CopyFrom(self.tensor())
        if r.random() < 0.15:
            s.text = r.choice(["the cat", "", "zzz qqq", "x" * 5000, "\x00\x01"])
        if r.random() < 0.3:
            s.expected_position = r.choice([-5, 0, 1, 3, 2**62])
        return s

    def native(self):
        r = self.r
        kind = r.randrange(6)
        if kind == 0:
            return NATIVE + "Step", [self.step()]
        if kind == 1:
            p = pb.PredictRequest(model=self.pick(MODELS), version=self.pick([0, 1, 3]))
            if r.random() < 0.8:
                p.x.CopyFrom(self.tensor())
            for name in ("h0", "c0"):
                if r.random() < 0.3:
                    getattr(p, name).CopyFrom(self.tensor())
            if r.random() < 0.2:
                p.text.extend(r.choice(["the cat sat", "", "??"]) for _ in range(r.randint(0, 3)))
            return NATIVE + "Predict", [p]
        if kind == 2:
            q = pb.RolloutRequest(model=self.pick(MODELS), steps=r.choice([-5, 0, 1, 3, 10**9]),
                                  commit=r.random() < 0.5)
            self.seq(q)
            if r.random() < 0.5:
                q.x.CopyFrom(self.tensor())
            return NATIVE + "Rollout", [q]
        if kind == 3:
            e = pb.EndSessionRequest(model=self.pick(MODELS), version=self.pick([0, 1, 5]))
            self.seq(e)
            return NATIVE + "EndSession", [e]
        if kind == 4:
            return NATIVE + "ModelMetadata", [pb.ModelMetadataRequest(
                model=self.pick(MODELS), version=self.pick([0, 1, -3, 2**62]))]
        messages = []
        for _ in range(r.randint(1, 3)):
            m = pb.StreamStepsRequest(steps=[self.step() for _ in range(r.randint(0, 5))])
            if r.random() < 0.4:
                b = m.batch
                b.model = self.pick(MODELS)
                n = r.randint(0, 6)
                if r.random() < 0.6:
                    b.sequence_ids.extend(r.choice([0, 1, 5, 5, 2**63]) for _ in range(n))
                if r.random() < 0.4:
                    b.sequence_keys.extend(r.choice(["", "k", "k"]) for _ in range(n))
                b.x.CopyFrom(self.tensor())
                b.start.extend(r.random() < 0.5 for _ in range(r.choice([0, n, n + 1])))
                b.end.extend(r.random() < 0.3 for _ in range(r.choice([0, n, 2])))
                if r.random() < 0.3:
                    b.expected_positions.extend(r.choice([-1, 0, 9]) for _ in range(r.choice([n, 1])))
            messages.append(m)
        return NATIVE + "StreamSteps", messages

    def infer(self) -> oip.ModelInferRequest:
        r = self.r
        q = oip.ModelInferRequest(model_name=self.pick(MODELS),
                                  model_version=self.pick(["", "1", "2", "-1", "x", "9" * 30]),
                                  id=self.pick(["", "req"]))
        for _ in range(r.randint(0, 3)):
            t = q.inputs.add(name=self.pick(["x", "x", "h0", "c0", "y", ""]),
                             datatype=self.pick(DATATYPES),
                             shape=[self.pick(DIMS) for _ in range(r.randint(0, 4))])
            if r.random() < 0.5:
                t.contents.fp32_contents.extend(self.floats(r.choice([0, 1, 3, 6])))
            if r.random() < 0.2:
                t.contents.int64_contents.extend(r.randint(-3, 20) for _ in range(r.randint(0, 4)))
            if r.random() < 0.1:
                t.contents.bytes_contents.append(os.urandom(r.randint(0, 16)))
            if r.random() < 0.2:
                t.parameters["binary_data_size"].int64_param = r.choice([-1, 0, 12, 2**40])
        if r.random() < 0.4:
            n = r.randint(0, len(q.inputs) + 1)
            for _ in range(n):
                vals = self.floats(r.choice([0, 1, 3, 5]))
                raw = struct.pack(f"<{len(vals)}f", *vals)
                q.raw_input_contents.append(raw if r.random() < 0.7 else os.urandom(r.randint(0, 13)))
        for _ in range(r.randint(0, 4)):
            key = self.pick(["sequence_id", "sequence_start", "sequence_end", "sequence_position",
                             "priority", "timeout", "binary_data_output", "unknown_thing", ""])
            p = q.parameters[key]
            kind = r.randrange(5)
            if kind == 0:
                p.bool_param = r.random() < 0.5
            elif kind == 1:
                p.int64_param = r.choice([-1, 0, 1, 7, 2**62])
            elif kind == 2:
                p.string_param = r.choice(["", "abc", "1", "\u2603"])
            elif kind == 3:
                p.double_param = r.choice(FLOATS)
            else:
                p.uint64_param = r.choice([0, 1, 2**64 - 1])
        for _ in range(r.randint(0, 2)):
            q.outputs.add(name=self.pick(["y", "hn", "cn", "nope", ""]))
        return q

    def oip(self):
        r = self.r
        if r.random() < 0.15:
            return OIP + "ModelStreamInfer", [self.infer() for _ in range(r.randint(1, 3))]
        if r.random() < 0.15:
            return OIP + self.pick(["ModelReady", "ModelMetadata"]), [
                oip.ModelReadyRequest(name=self.pick(MODELS), version=self.pick(["", "1", "z"]))]
        return OIP + "ModelInfer", [self.infer()]

    def raw(self):
        """Random bytes, or a valid message with bytes flipped or cut, on any path."""
        r = self.r
        path = self.pick(UNARY + STREAMS)
        n = r.randint(1, 3) if path in STREAMS else 1
        out = []
        for _ in range(n):
            if r.random() < 0.5:
                out.append(os.urandom(r.choice([0, 1, 2, 5, 17, 64, 300, 4096])))
            else:
                data = bytearray(self.step().SerializeToString() if path.startswith(NATIVE)
                                 else self.infer().SerializeToString())
                for _ in range(r.randint(1, 4)):
                    if data:
                        data[r.randrange(len(data))] = r.randrange(256)
                if r.random() < 0.3:
                    data = data[: r.randint(0, len(data))]
                out.append(bytes(data))
        return path, out

    def request(self):
        """(kind, path, [bytes])."""
        r = self.r.random()
        if r < 0.3:
            path, msgs = self.raw()
            return "raw", path, msgs
        path, msgs = self.native() if r < 0.65 else self.oip()
        return "structured", path, [m.SerializeToString() for m in msgs]


def _code(exc_or_none):
    return grpc.StatusCode.OK if exc_or_none is None else exc_or_none.code()


async def _send(channel, path, messages):
    ident = dict(request_serializer=None, response_deserializer=None)
    if path in STREAMS:
        call = channel.stream_stream(path, **ident)(iter(messages), timeout=20)
        async for _ in call:
            pass
    else:
        await channel.unary_unary(path, **ident)(messages[0], timeout=20)


async def _well_behaved(channel, xs, stop: asyncio.Event):
    """One session stepping through StreamSteps all along; its outputs and errors."""
    stub = channel.stream_stream(NATIVE + "StreamSteps",
                                 request_serializer=pb.StreamStepsRequest.SerializeToString,
                                 response_deserializer=pb.StreamStepsResponse.FromString)
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item

    call = stub(requests())
    ys, t = [], 0
    while t < len(xs) and (not stop.is_set() or t < 50):
        step = pb.StepRequest(model="lstm", sequence_key="good-citizen", start=t == 0,
                              x=pb.Tensor(shape=[3], float_data=xs[t].tolist()))
        await queue.put(pb.StreamStepsRequest(steps=[step]))
        reply = await call.read()
        r = reply.results[0]
        assert r.code == 0, r.error
        ys.append(list(r.y.float_data))
        t += 1
        await asyncio.sleep(0.002)
    await queue.put(None)
    assert await call.code() == grpc.StatusCode.OK
    return np.array(ys, np.float32)


def test_fuzz_live_server(fuzz_server, model_repo, kit):
    gen = Gen(SEED)
    counts = collections.Counter()
    bad = []
    xs = np.random.default_rng(5).normal(size=(4000, 3)).astype(np.float32)

    async def main():
        big = b"\x0a" + b"\xff" * (1 << 21)  # over --max-message-bytes
        async with grpc.aio.insecure_channel(fuzz_server.target) as fuzz_ch, \
                grpc.aio.insecure_channel(fuzz_server.target) as good_ch:
            stop = asyncio.Event()
            good = asyncio.ensure_future(_well_behaved(good_ch, xs, stop))
            sem = asyncio.Semaphore(CONCURRENCY)

            async def one(kind, path, msgs):
                async with sem:
                    try:
                        await _send(fuzz_ch, path, msgs)
                        exc = None
                    except grpc.aio.AioRpcError as e:
                        exc = e
                code = _code(exc)
                counts[(kind, code.name)] += 1
                ok = code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.INTERNAL)
                if code == grpc.StatusCode.INTERNAL and path in STREAMS and len(msgs) > 1 and \
                        exc.details() == "Internal error from Core":
                    # the server ended the call (INVALID_ARGUMENT at a bad message) while
                    # this grpc.aio client was still writing the next one: the aio client
                    # reports its failed write so. A blocking client gets INVALID_ARGUMENT
                    # every time (checked 300 of 300).
                    counts[("client-write-after-end", code.name)] += 1
                    ok = True
                if not ok:
                    bad.append((kind, path, code.name, exc.details() if exc else ""))
                    if os.environ.get("FUZZ_DUMP"):
                        import pickle
                        with open(os.environ["FUZZ_DUMP"], "ab") as f:
                            pickle.dump((path, msgs), f)

            jobs = [one(*gen.request()) for _ in range(COUNT)]
            jobs += [one("oversized", NATIVE + "Step", [big]) for _ in range(5)]
            await asyncio.gather(*jobs)
            stop.set()
            ys = await good
            # still serving: a fresh, proper call works
            reply = await good_ch.unary_unary(
                NATIVE + "ListModels", request_serializer=pb.ListModelsRequest.SerializeToString,
                response_deserializer=pb.ListModelsResponse.FromString)(pb.ListModelsRequest())
            return ys, reply

    ys, models = asyncio.run(main())
    total = sum(n for (kind, _), n in counts.items() if kind in ("raw", "structured", "oversized"))
    summary = ", ".join(f"{k}/{c}={n}" for (k, c), n in sorted(counts.items()))
    print(f"\nfuzz: {total} requests (seed {SEED}); {summary}; good stream {len(ys)} steps")
    assert total >= COUNT
    assert not bad, [(k, p, c, d[:300]) for k, p, c, d in bad[:10]]
    assert counts[("oversized", "RESOURCE_EXHAUSTED")] == 5
    assert {m.name for m in models.models} >= {"lstm", "gru", "rnn", "lm"}
    assert fuzz_server.thread.is_alive()
    want = kit.ort_reference(model_repo / "lstm" / "1" / "model.onnx", xs[None, : len(ys)])["y"][0]
    np.testing.assert_allclose(ys, want, atol=1e-4)  # the well-behaved session was unaffected


def test_unparsable_bytes_are_invalid_argument_on_both_protocols(fuzz_server):
    ch = fuzz_server.channel
    for path in (NATIVE + "Step", NATIVE + "Predict", OIP + "ModelInfer", OIP + "ModelMetadata"):
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(path)(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
        assert "not a valid" in err.value.details()
    for path in STREAMS:  # a good (empty) message, then garbage: answered, then INVALID_ARGUMENT
        call = ch.stream_stream(path)(iter([b"", b"\xff\xff"]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
