"""Per-step latency: the Open Inference Protocol (tritonclient) vs the native API.

    python -m serving.oip_bench [--repo model_repository] [--model NAME]
                                [--steps 100] [--rounds 20] [--json FILE]

Starts `seqserve serve` in its own process, then drives ONE session step by
step (each step waits for its answer) along these paths, in the same run:
  oip-infer          tritonclient InferenceServerClient.infer(sequence_id=...)
  oip-stream         tritonclient start_stream + async_stream_infer, one in flight
  oip-infer-raw      ModelInfer through a bare grpc stub (no tritonclient)
  oip-stream-raw     ModelStreamInfer through a bare grpc stub, one in flight
  native-step        seqserve.v1 Step (unary) through serving.client.Client
  native-stream      seqserve.v1 StreamSteps through Client.stream(), one message per step
  oip-stream-fanout-64   64 sequences on one tritonclient stream: each tick sends
                     one request per sequence, then waits for all 64 answers
  native-stream-fanout-64  the same on StreamSteps: one message per step
  native-multiplex-64    the native way to do that: one StreamSteps message
                     carrying the 64 sessions' steps per tick
For the fan-out rows p50/p99 are per TICK (64 steps), steps/s counts steps.
The *-raw rows separate what tritonclient costs on the client from what the
OIP path costs on the server. Paths take turns in `rounds` blocks so the
drift of a shared, noisy machine hits them alike. Prints a table, then JSON
rows {"path", "p50_us", "p99_us", "steps_per_s", "steps", "ratio_p50"} (ratio
against the native path of the same shape: unary, stream, or stream fan-out).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from seqserve import artifact

FANOUT = 64
PATHS = ("oip-infer", "oip-stream", "oip-infer-raw", "oip-stream-raw",
         "native-step", "native-stream", f"oip-stream-fanout-{FANOUT}",
         f"native-stream-fanout-{FANOUT}", f"native-multiplex-{FANOUT}")
BASELINE = {"oip-infer": "native-step", "oip-infer-raw": "native-step",
            "oip-stream": "native-stream", "oip-stream-raw": "native-stream",
            f"oip-stream-fanout-{FANOUT}": f"native-stream-fanout-{FANOUT}",
            f"native-multiplex-{FANOUT}": f"native-stream-fanout-{FANOUT}"}
STEPS_PER_SAMPLE = {f"oip-stream-fanout-{FANOUT}": FANOUT,
                    f"native-stream-fanout-{FANOUT}": FANOUT, f"native-multiplex-{FANOUT}": FANOUT}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: str, port: int, log_path: Path) -> subprocess.Popen:
    """`seqserve serve` in its own process; returns once every model is ready."""
    cmd = [sys.executable, "-m", "seqserve", "serve", "--repo", repo, "--port", str(port),
           "--metrics-port", "0", "--state-dir", "", "--log-level", "WARNING"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    from protos.inference import messages as pb  # wait with a plain stub: no tritonclient yet

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        ready = channel.unary_unary("/inference.GRPCInferenceService/ServerReady",
                                    request_serializer=pb.ServerReadyRequest.SerializeToString,
                                    response_deserializer=pb.ServerReadyResponse.FromString)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
            try:
                if ready(pb.ServerReadyRequest(), timeout=1).ready:
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"server not ready after 300 s; see {log_path}")


# ---- one driver per path: drive(x) runs len(x) steps of a fresh session, returns seconds per step


def oip_drivers(address: str, model: str):
    import tritonclient.grpc as triton

    from protos.inference import messages as pb

    client = triton.InferenceServerClient(address)
    counter = iter(range(1, 1 << 62))

    def infer_input(x):
        item = triton.InferInput("x", list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        return item

    def oip_infer(xs):
        sid, times = next(counter), []
        for t, x in enumerate(xs):
            t0 = time.perf_counter()
            client.infer(model, [infer_input(x)], sequence_id=sid, sequence_start=t == 0,
                         sequence_end=t == len(xs) - 1).as_numpy("y")
            times.append(time.perf_counter() - t0)
        return times

    def oip_stream(xs):
        sid, times, answers = next(counter), [], queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for t, x in enumerate(xs):
                t0 = time.perf_counter()
                client.async_stream_infer(model, [infer_input(x)], sequence_id=sid,
                                          sequence_start=t == 0, sequence_end=t == len(xs) - 1)
                result, error = answers.get()
                if error is not None:
                    raise RuntimeError(error.message())
                result.as_numpy("y")
                times.append(time.perf_counter() - t0)
        finally:
            client.stop_stream()
        return times

    channel = grpc.insecure_channel(address)
    unary = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=pb.ModelInferRequest.SerializeToString,
                                response_deserializer=pb.ModelInferResponse.FromString)
    bidi = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                 request_serializer=pb.ModelInferRequest.SerializeToString,
                                 response_deserializer=pb.ModelStreamInferResponse.FromString)

    def raw_request(sid, t, n, x):
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(x.tobytes())
        request.parameters["sequence_id"].int64_param = sid
        request.parameters["sequence_start"].bool_param = t == 0
        request.parameters["sequence_end"].bool_param = t == n - 1
        return request

    def decode(response):
        return np.frombuffer(response.raw_output_contents[0], np.float32)

    def oip_infer_raw(xs):
        sid, times = next(counter), []
        for t, x in enumerate(xs):
            t0 = time.perf_counter()
            decode(unary(raw_request(sid, t, len(xs), x)))
            times.append(time.perf_counter() - t0)
        return times

    def check_stream(reply):
        if reply.error_message:
            raise RuntimeError(reply.error_message)
        return decode(reply.infer_response)

    def oip_stream_raw(xs):
        n = len(xs)
        return _lockstep(bidi, xs, lambda sid, t, x: raw_request(sid, t, n, x), next(counter),
                         check_stream)

    def oip_fanout(xs):
        sids = [next(counter) for _ in range(FANOUT)]
        times, answers = [], queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for t, x in enumerate(xs):
                t0 = time.perf_counter()
                for sid in sids:
                    client.async_stream_infer(model, [infer_input(x)], sequence_id=sid,
                                              sequence_start=t == 0, sequence_end=t == len(xs) - 1)
                for _ in sids:
                    result, error = answers.get()
                    if error is not None:
                        raise RuntimeError(error.message())
                    result.as_numpy("y")
                times.append(time.perf_counter() - t0)
        finally:
            client.stop_stream()
        return times

    return {"oip-infer": oip_infer, "oip-stream": oip_stream, "oip-infer-raw": oip_infer_raw,
            "oip-stream-raw": oip_stream_raw, f"oip-stream-fanout-{FANOUT}": oip_fanout}, \
        (client, channel)


def _lockstep(bidi, xs, make, sid, check):
    """One message in flight on a bidi stream: send, wait for the answer, repeat."""
    outbox: queue.Queue = queue.Queue()
    times = []

    def requests():
        while True:
            item = outbox.get()
            if item is None:
                return
            yield item

    replies = bidi(requests())
    try:
        for t, x in enumerate(xs):
            t0 = time.perf_counter()
            outbox.put(make(sid, t, x))
            check(next(replies))
            times.append(time.perf_counter() - t0)
    finally:
        outbox.put(None)
        for _ in replies:  # drain until the server closes its side
            pass
    return times


def native_drivers(address: str, model: str):
    """The native API through its own client, serving.client, as a user would call it."""
    from protos.seqserve.v1 import inference_pb2 as npb
    from serving.client import Client, array, step_request

    client = Client(address)
    counter = iter(range(1 << 40, 1 << 62))

    def native_step(xs):
        sid, times = next(counter), []
        for t, x in enumerate(xs):
            t0 = time.perf_counter()
            client.step(model, sid, x[0], start=t == 0, end=t == len(xs) - 1)  # x[0]: (1, F)
            times.append(time.perf_counter() - t0)
        return times

    def native_stream(xs):
        sid, times = next(counter), []
        with client.stream(model) as stream:
            for t, x in enumerate(xs):
                t0 = time.perf_counter()
                stream.step(sid, x[0], start=t == 0, end=t == len(xs) - 1)
                times.append(time.perf_counter() - t0)
        return times

    def native_fanout(xs):
        sids = [next(counter) for _ in range(FANOUT)]
        times, outbox = [], queue.Queue()
        replies = client.stub.StreamSteps(iter(outbox.get, None))
        try:
            for t, x in enumerate(xs):
                t0 = time.perf_counter()
                for sid in sids:
                    outbox.put(npb.StreamStepsRequest(steps=[step_request(
                        model, sid, x[0], start=t == 0, end=t == len(xs) - 1)]))
                for _ in sids:
                    (r,) = next(replies).results
                    if r.code:
                        raise RuntimeError(r.error)
                    array(r.y)
                times.append(time.perf_counter() - t0)
        finally:
            outbox.put(None)
            for _ in replies:
                pass
        return times

    def native_multiplex(xs):
        sids = [next(counter) for _ in range(FANOUT)]
        times = []
        with client.stream(model) as stream:
            for t, x in enumerate(xs):
                t0 = time.perf_counter()
                steps = [step_request(model, sid, x[0], start=t == 0, end=t == len(xs) - 1)
                         for sid in sids]
                for r in stream.send(steps):
                    if r.code:
                        raise RuntimeError(r.error)
                    array(r.y)
                times.append(time.perf_counter() - t0)
        return times

    return {"native-step": native_step, "native-stream": native_stream,
            f"native-stream-fanout-{FANOUT}": native_fanout,
            f"native-multiplex-{FANOUT}": native_multiplex}, (client,)


def summarize(times: dict[str, list[float]]) -> list[dict]:
    rows = {}
    for path, ts in times.items():
        a = np.asarray(ts) * 1e6
        per = STEPS_PER_SAMPLE.get(path, 1)
        rows[path] = {"path": path, "p50_us": round(float(np.percentile(a, 50)), 1),
                      "p99_us": round(float(np.percentile(a, 99)), 1),
                      "steps_per_s": round(float(len(a) * per / a.sum() * 1e6), 1),
                      "steps": len(a) * per}
    for path, row in rows.items():
        base = rows.get(BASELINE.get(path, path))
        row["ratio_p50"] = round(row["p50_us"] / base["p50_us"], 3) if base else None
    return [rows[p] for p in PATHS if p in rows]


def table(rows: list[dict]) -> str:
    lines = [f"{'path':<24}{'p50 us':>10}{'p99 us':>10}{'steps/s':>10}   vs native p50"]
    for r in rows:
        base = BASELINE.get(r["path"])
        ratio = f"{r['ratio_p50']:.2f}x {base}" if base else "baseline"
        lines.append(f"{r['path']:<24}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}"
                     f"{r['steps_per_s']:>10.1f}   {ratio}")
    return "\n".join(lines)


def pick_model(repo: str, name: str | None) -> tuple[str, int]:
    """(name, features) of the model to drive: NAME, or the first that can stream."""
    models = artifact.list_models(repo)
    if not models:
        raise ValueError(f"no model in repository {repo!r}: run `make model` or pass --repo")
    for candidate in ([name] if name else sorted(models)):
        if candidate not in models:
            raise ValueError(f"no model {candidate!r} in {repo!r} (has {', '.join(sorted(models))})")
        info = artifact.load_model_info(artifact.model_path(repo, candidate), name=candidate)
        if info.can_stream and info.input_kind == "float":
            return candidate, info.input_features
        if name:
            raise ValueError(f"model {name!r} cannot stream float steps; pick another with --model")
    raise ValueError(f"no model in {repo!r} streams float steps; pass --model")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.oip_bench", description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=artifact.DEFAULT_REPO, help="model repository")
    p.add_argument("--model", default=None, help="model to drive (default: first that streams)")
    p.add_argument("--steps", type=int, default=100, help="steps per path per round")
    p.add_argument("--rounds", type=int, default=20, help="rounds; paths take turns each round")
    p.add_argument("--warmup", type=int, default=100, help="untimed steps per path first")
    p.add_argument("--json", default="", help="also write the JSON rows to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        print("oip_bench: --steps and --rounds must be positive, --warmup not negative",
              file=sys.stderr)
        return 2
    try:
        model, features = pick_model(args.repo, args.model)
    except ValueError as exc:
        print(f"oip_bench: {exc}", file=sys.stderr)
        return 2
    port = _free_port()
    address = f"127.0.0.1:{port}"
    log_path = Path(tempfile.gettempdir()) / f"oip_bench_server_{os.getpid()}.log"
    proc = start_server(args.repo, port, log_path)
    clients = ()
    try:
        drivers, oip_clients = oip_drivers(address, model)
        native, native_clients = native_drivers(address, model)
        drivers.update(native)
        clients = oip_clients + native_clients
        rng = np.random.default_rng(0)
        steps = rng.normal(size=(args.steps, 1, 1, features)).astype(np.float32)  # (T, 1, 1, F)
        warm = rng.normal(size=(max(args.warmup, 1), 1, 1, features)).astype(np.float32)
        for path in PATHS:
            drivers[path](warm)
        times = {path: [] for path in PATHS}
        for r in range(args.rounds):
            order = PATHS if r % 2 == 0 else PATHS[::-1]  # alternate who goes first
            for path in order:
                times[path] += drivers[path](steps)
        rows = summarize(times)
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(30)
    print(f"model {model!r}, {args.rounds} rounds x {args.steps} steps (fan-out: ticks) per path, "
          f"server in its own process")
    print(table(rows))
    text = json.dumps(rows)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
