"""`seqserve bench serve`: the server's step path against a do-nothing echo.

Both servers run in their own process; the same grpc.aio client, sending the
same seqserve.v1 messages, measures both in one run, taking turns (rounds
of echo, then step, then step, then echo...) so that load from elsewhere on
a shared machine falls on both alike:

  echo-unary / step-unary         sequential Step RPCs: p50 / p99 latency
  echo-stream / step-stream       one StreamSteps call, one message each way
  echo-fanout-N / step-fanout-N   N concurrent streams (one session each): steps/s
  step-multiplex-100              one stream, 100 sessions per message: session-steps/s

The echo service answers Step / StreamSteps with a canned reply of the same
shape without parsing anything (bytes in, canned bytes out, as
../shared/tools/grpc_floor.py does), so the difference is what seqserve
itself costs (parsing, checks, session lookup, batching, the Numba step,
metrics). Both run on the same event loop (`--loop`, uvloop by default). Then it starts 100,000
sessions and compares the server's memory growth with their raw state bytes.

  python -m serving.bench serve --repo model_repository --model sine-lstm [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from protos.seqserve.v1 import inference_pb2 as pb
from protos.seqserve.v1 import inference_pb2_grpc as pb_grpc
from serving import eventloop, wire

TARGETS = {  # path -> (compared with, bound, kind) as issue 5 states them
    "step-stream": ("echo-stream", 1.25, "p50"),
    "step-unary": ("echo-unary", 1.2, "p50"),
    "step-fanout-256": ("echo-fanout-256", 0.8, "rate"),
}


# ---- the echo server (its own process) --------------------------------------------------

class EchoServicer:
    """Step / StreamSteps that do nothing but answer a canned reply of the right shape.

    Like ../shared/tools/grpc_floor.py, no protobuf work at all: requests stay
    bytes and the reply is serialized once, so the echo is the floor of the
    transport alone (the server parses what it must).
    """

    def __init__(self, outputs: int):
        result = pb.StepResponse(y=pb.Tensor(shape=[1, outputs], float_data=[0.0] * outputs),
                                 position=1)
        self.unary = result.SerializeToString()
        self.result = result
        self.replies: dict[int, bytes] = {}  # request size -> canned StreamSteps reply

    async def Step(self, request: bytes, context):
        return self.unary

    async def StreamSteps(self, request_iterator, context):
        async for raw in request_iterator:
            reply = self.replies.get(len(raw))
            if reply is None:  # one step per message here, except step-multiplex (not echoed)
                n = len(pb.StreamStepsRequest.FromString(raw).steps)
                reply = self.replies[len(raw)] = pb.StreamStepsResponse(
                    results=[self.result] * n).SerializeToString()
            yield reply

    def handlers(self):
        # no (de)serializers: bytes in and out with no Python call per message,
        # as the server's own Step and StreamSteps (serving.wire)
        return grpc.method_handlers_generic_handler("seqserve.v1.Inference", {
            "Step": grpc.unary_unary_rpc_method_handler(self.Step),
            "StreamSteps": grpc.stream_stream_rpc_method_handler(self.StreamSteps)})


def echo_server_main(port: int, outputs: int, loop: str = "auto") -> None:
    async def run():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((EchoServicer(outputs).handlers(),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    eventloop.run(run(), loop)


# ---- measuring --------------------------------------------------------------------------

def _pct(xs, p) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def _row(path, lat_ns, steps_per_s) -> dict:
    return {"path": path, "p50_us": round(_pct(lat_ns, 50) / 1e3, 1),
            "p99_us": round(_pct(lat_ns, 99) / 1e3, 1), "steps_per_s": round(steps_per_s, 1)}


def _step(model, sid, x, start=False) -> pb.StepRequest:
    if isinstance(sid, int):
        return pb.StepRequest(model=model, sequence_id=sid, start=start,
                              x=pb.Tensor(shape=[len(x)], float_data=x))
    return pb.StepRequest(model=model, sequence_key=sid, start=start,
                          x=pb.Tensor(shape=[len(x)], float_data=x))


class _Unary:
    """Sequential Step RPCs on one session."""

    def __init__(self, ch, model, x):
        self.stub = pb_grpc.InferenceStub(ch)
        self.model, self.x = model, x
        self.req = _step(model, "bench-unary", x)

    async def open(self, warm=200):
        await self.stub.Step(_step(self.model, "bench-unary", self.x, start=True))
        for _ in range(warm):
            await self.stub.Step(self.req)

    async def run(self, n, lat):
        for _ in range(n):
            t = time.perf_counter_ns()
            await self.stub.Step(self.req)
            lat.append(time.perf_counter_ns() - t)


class _Stream:
    """One StreamSteps call; each message carries `sessions` sessions' steps
    (more than one: the packed SessionBatch form a gateway would send)."""

    def __init__(self, ch, model, x, sessions=1, sid="bench-stream"):
        self.call = pb_grpc.InferenceStub(ch).StreamSteps()
        self.ids = [f"{sid}-{i}" for i in range(sessions)]
        self.model, self.x = model, x
        if sessions == 1:
            self.msg = pb.StreamStepsRequest(steps=[_step(model, s, x) for s in self.ids])
            self.first = pb.StreamStepsRequest(steps=[_step(model, s, x, start=True) for s in self.ids])
        else:
            xs = pb.Tensor(shape=[sessions, len(x)], float_data=x * sessions)
            self.msg = pb.StreamStepsRequest(batch=pb.SessionBatch(
                model=model, sequence_keys=self.ids, x=xs))
            self.first = pb.StreamStepsRequest(batch=pb.SessionBatch(
                model=model, sequence_keys=self.ids, x=xs, start=[True] * sessions))

    async def open(self, warm=200):
        await self.call.write(self.first)
        await self.call.read()
        for _ in range(warm):
            await self.call.write(self.msg)
            await self.call.read()

    async def run(self, n, lat):
        for _ in range(n):
            t = time.perf_counter_ns()
            await self.call.write(self.msg)
            reply = await self.call.read()
            lat.append(time.perf_counter_ns() - t)
        codes = list(reply.batch.codes) or [r.code for r in reply.results]
        if any(codes):
            raise RuntimeError(f"step failed: {(list(reply.batch.errors) or [reply.results[0].error])[0]}")

    async def close(self):
        await self.call.done_writing()
        await self.call.code()  # the server's final status, before the channel closes


async def _fanout(target, model, x, streams, per_stream, lat):
    """`streams` concurrent streams, one session each; returns (steps, seconds)."""
    chans = [grpc.aio.insecure_channel(target) for _ in range(max(1, streams // 16))]

    async def one(i):
        call = pb_grpc.InferenceStub(chans[i % len(chans)]).StreamSteps()
        sid = f"fan-{streams}-{i}"
        await call.write(pb.StreamStepsRequest(steps=[_step(model, sid, x, start=True)]))
        await call.read()
        msg = pb.StreamStepsRequest(steps=[_step(model, sid, x)])
        await ready.wait()  # every stream open before the clock starts
        for _ in range(per_stream):
            t = time.perf_counter_ns()
            await call.write(msg)
            await call.read()
            lat.append(time.perf_counter_ns() - t)
        await call.done_writing()
        await call.code()  # the server's final status, before the channel closes

    ready = asyncio.Event()
    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    dt = time.perf_counter() - t0
    for c in chans:
        await c.close()
    return streams * per_stream, dt


async def measure(echo: str, server: str, model: str, features: int, steps: int,
                  rounds: int = 40) -> list[dict]:
    """Echo and step paths measured in alternating rounds, so that load from
    elsewhere on a shared machine falls on both alike."""
    x = [0.1] * features
    per = max(1, steps // rounds)
    lat = {k: [] for k in ("echo-unary", "step-unary", "echo-stream", "step-stream")}
    rate: dict[str, list] = {}
    async with grpc.aio.insecure_channel(echo) as ech, grpc.aio.insecure_channel(server) as sch:
        for kind, cls in (("unary", _Unary), ("stream", _Stream)):
            pair = {"echo": cls(ech, model, x), "step": cls(sch, model, x)}
            for obj in pair.values():
                await obj.open()
            spent = {"echo": 0.0, "step": 0.0}
            for r in range(rounds):
                for who in (("echo", "step") if r % 2 == 0 else ("step", "echo")):
                    t0 = time.perf_counter()
                    await pair[who].run(per, lat[f"{who}-{kind}"])
                    spent[who] += time.perf_counter() - t0
            for who in pair:
                rate[f"{who}-{kind}"] = [per * rounds, spent[who]]
                if kind == "stream":
                    await pair[who].close()
    for n in (64, 256):
        for who, target in (("echo", echo), ("step", server)):
            lat[f"{who}-fanout-{n}"] = []
            rate[f"{who}-fanout-{n}"] = [0, 0.0]
        per_stream = max(10, steps // n // 4)
        for r in range(8):  # echo, step, step, echo, ...: short turns, so a slow spell hits both
            for who, target in ((("echo", echo), ("step", server)) if r % 2 == 0 else
                                (("step", server), ("echo", echo))):
                k = f"{who}-fanout-{n}"
                done, dt = await _fanout(target, model, x, n, per_stream, lat[k])
                rate[k][0] += done
                rate[k][1] += dt
    async with grpc.aio.insecure_channel(server) as sch:
        mux = _Stream(sch, model, x, sessions=100, sid="mux")
        await mux.open(warm=20)
        lat["step-multiplex-100"] = []
        t0 = time.perf_counter()
        await mux.run(max(100, steps // 10), lat["step-multiplex-100"])
        rate["step-multiplex-100"] = [100 * max(100, steps // 10), time.perf_counter() - t0]
        await mux.close()
    return [_row(k, lat[k], rate[k][0] / rate[k][1]) for k in lat]


# ---- memory of 100,000 live sessions -----------------------------------------------------------

def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


async def _start_sessions(target, model, features, n, per_message=1000):
    x = [0.1] * features
    async with grpc.aio.insecure_channel(target) as ch:
        call = pb_grpc.InferenceStub(ch).StreamSteps()
        for lo in range(0, n, per_message):
            ids = range(lo, min(n, lo + per_message))
            await call.write(pb.StreamStepsRequest(
                steps=[_step(model, 1_000_000 + i, x, start=True) for i in ids]))
            reply = await call.read()
            bad = [r.error for r in reply.results if r.code]
            if bad:
                raise RuntimeError(f"starting sessions failed: {bad[0]}")
        await call.done_writing()
        await call.code()


def memory(target, pid, meta, sessions: int) -> dict:
    state_floats = meta.layers * meta.directions * meta.hidden * (2 if meta.cell == "lstm" else 1)
    raw = sessions * state_floats * 4
    before = _rss(pid)
    asyncio.run(_start_sessions(target, meta.name, meta.input_features, sessions))
    after = _rss(pid)
    return {"sessions": sessions, "raw_state_bytes": raw, "rss_before": before, "rss_after": after,
            "growth_bytes": after - before, "growth_over_raw": round((after - before) / raw, 3)}


# ---- orchestration --------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(target: str, proc, timeout: float = 300) -> None:
    from serving.client import Client

    with Client(target) as c:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
            try:
                c.wait_ready(timeout=2)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise


def _ready_echo(target, timeout=60):
    ch = grpc.insecure_channel(target)
    grpc.channel_ready_future(ch).result(timeout)
    ch.close()


def bench_serve(repo: str, model: str, steps: int, sessions: int, log=print,
                loop: str = "auto") -> dict:
    from serving.client import Client

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sport, eport = _free_port(), _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "seqserve", "serve", "--repo", repo, "--port", str(sport),
         "--metrics-port", "0", "--max-sessions", str(max(200_000, sessions + 1000)),
         "--log-level", "WARNING", "--loop", loop], env=env)
    try:
        target = f"127.0.0.1:{sport}"
        _wait_health(target, server)
        with Client(target) as c:
            meta = c.metadata(model)
        if not meta.can_stream or meta.input_kind != "float":
            raise ValueError(f"model {model!r} must be a float-input streaming model for this bench")
        echo = subprocess.Popen([sys.executable, "-m", "serving.bench", "echo-server", "--port",
                                 str(eport), "--outputs", str(meta.output_size), "--loop", loop],
                                env=env)
        try:
            _ready_echo(f"127.0.0.1:{eport}")
            log(f"model {model}: {meta.cell} {meta.layers}x{meta.hidden}, ONNX Runtime "
                f"{meta.ort_provider}, cell {meta.cell_device}; {steps} steps per path; "
                f"server and echo on the {eventloop.resolve(loop)} event loop; "
                f"streaming hot path {wire.HOTPATH}")
            measured = asyncio.run(measure(f"127.0.0.1:{eport}", target, model,
                                           meta.input_features, steps))
        finally:
            echo.terminate()
            echo.wait(10)
        mem = memory(target, server.pid, meta, sessions) if sessions else None
    finally:
        server.terminate()
        server.wait(60)
    order = ["echo-unary", "echo-stream", "step-unary", "step-stream", "echo-fanout-64",
             "step-fanout-64", "echo-fanout-256", "step-fanout-256", "step-multiplex-100"]
    by_path = {r["path"]: r for r in measured}
    rows = [by_path[p] for p in order]
    ratios = {}
    for path, (base, bound, kind) in TARGETS.items():
        a, b = by_path[path], by_path[base]
        ratio = a["p50_us"] / b["p50_us"] if kind == "p50" else a["steps_per_s"] / b["steps_per_s"]
        ok = ratio <= bound if kind == "p50" else ratio >= bound
        ratios[path] = {"vs": base, "ratio": round(ratio, 3), "target": bound, "met": ok}
    mux = by_path["step-multiplex-100"]["steps_per_s"]
    ratios["step-multiplex-100"] = {"session_steps_per_s": mux, "target": 100_000, "met": mux >= 100_000}
    return {"model": model, "loop": eventloop.resolve(loop),
            "device": {"ort": meta.ort_provider, "cell": meta.cell_device},
            "rows": rows, "targets": ratios, "memory": mem}


def _table(report: dict) -> str:
    lines = [f"{'path':<22}{'p50_us':>10}{'p99_us':>10}{'steps_per_s':>14}"]
    for r in report["rows"]:
        lines.append(f"{r['path']:<22}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}{r['steps_per_s']:>14.1f}")
    lines.append("")
    for path, t in report["targets"].items():
        if "ratio" in t:
            lines.append(f"{path:<18} / {t['vs']:<16} = {t['ratio']:.3f}  (target "
                         f"{'<=' if t['target'] > 1 else '>='} {t['target']})  {'met' if t['met'] else 'MISSED'}")
        else:
            lines.append(f"{path:<18} {t['session_steps_per_s']:.0f} session-steps/s (target >= "
                         f"{t['target']})  {'met' if t['met'] else 'MISSED'}")
    m = report.get("memory")
    if m:
        lines.append(f"memory: {m['sessions']} live sessions grew RSS by {m['growth_bytes'] / 2**20:.1f} MiB "
                     f"for {m['raw_state_bytes'] / 2**20:.1f} MiB of raw state = {m['growth_over_raw']:.2f}x "
                     f"(target < 1.5x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "echo-server":
        p = argparse.ArgumentParser(prog="serving.bench echo-server")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--outputs", type=int, default=1)
        p.add_argument("--loop", default="auto", choices=eventloop.CHOICES)
        a = p.parse_args(argv[1:])
        echo_server_main(a.port, a.outputs, a.loop)
        return 0
    if argv and argv[0] == "serve":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="seqserve bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default="model_repository")
    p.add_argument("--model", default="sine-lstm")
    p.add_argument("--steps", type=int, default=3000, help="measured steps per latency path")
    p.add_argument("--sessions", type=int, default=100_000, help="live sessions for the memory figure (0 skips)")
    p.add_argument("--loop", default="auto", choices=eventloop.CHOICES,
                   help="event loop of both servers (seqserve serve --loop)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--out", default="reports/bench_serve.json", help="full report (rows, ratios, memory)")
    a = p.parse_args(argv)
    quiet = (lambda *_: None) if a.json else print
    report = bench_serve(a.repo, a.model, a.steps, a.sessions, log=quiet, loop=a.loop)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["rows"]) if a.json else _table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
