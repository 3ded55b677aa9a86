"""`seqserve bench soak`: a long run watching latency, memory, overload and crashes.

  seqserve bench soak --repo REPO --model NAME --minutes N [--json]
      W concurrent streams keep starting sessions, stepping each a random
      number of steps (with expected positions) and ending it: thousands of
      sessions over the run. Every --interval-s a row: steps/s, p50/p99 step
      latency, sessions started/ended, live sessions and the server's RSS.
  --overload   more concurrent Predict calls (big batches, run in worker
      threads) than the server can serve: once with no useful bound
      (--max-predict-inflight 100000: latency grows with the queue), once with
      --max-predict-inflight LIMIT (the excess is refused at once with
      RESOURCE_EXHAUSTED and the accepted calls keep their latency).
      A one-process Python client cannot overload the streaming path itself
      on a small machine (the client saturates first), hence Predict.
  --kill9      long-lived sessions stepping while the server snapshots every
      --snapshot-s; kill -9, restart from the state dir, and ask every session
      its position: what was lost is only what came after the last snapshot.

The server runs in its own process (`seqserve serve`), so its RSS is its own.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np

from protos.seqserve.v1 import inference_pb2 as pb
from protos.seqserve.v1 import inference_pb2_grpc as pb_grpc
from serving.bench import _free_port, _rss, _wait_health

POSITION_METADATA = "seqserve-position"


# ---- the server process -----------------------------------------------------------------------

def start_server(repo: str, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "seqserve", "serve", "--repo", repo, "--port", str(port),
           "--metrics-port", "0", "--log-level", "WARNING", *extra]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _wait_health(f"127.0.0.1:{port}", proc)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _step(model, sid, x, *, start=False, end=False, expect=None) -> pb.StepRequest:
    s = pb.StepRequest(model=model, sequence_key=sid, start=start, end=end,
                       x=pb.Tensor(shape=[len(x)], float_data=x))
    if expect is not None:
        s.expected_position = expect
    return s


class Interval:
    """Latencies and counts of one reporting interval."""

    def __init__(self):
        self.lat: list[int] = []
        self.refused: list[int] = []
        self.started = self.ended = self.errors = 0


def _us(lat_ns: list[int], p: float) -> float:
    """Percentile p of nanosecond latencies, in microseconds (nan when empty)."""
    return round(float(np.percentile(lat_ns, p)) / 1e3, 1) if lat_ns else float("nan")


def _row(t: float, iv: Interval, seconds: float, rss: int) -> dict:
    row = {"t_s": round(t, 1), "steps": len(iv.lat), "steps_per_s": round(len(iv.lat) / seconds, 1),
           "p50_us": _us(iv.lat, 50), "p99_us": _us(iv.lat, 99),
           "started": iv.started, "ended": iv.ended, "errors": iv.errors,
           "rss_mib": round(rss / 2**20, 1)}
    if iv.refused:
        row.update(refused=len(iv.refused), refused_p50_us=_us(iv.refused, 50),
                   refused_p99_us=_us(iv.refused, 99))
    return row


async def _reporter(pid, seconds, interval_s, state, log):
    """Close an Interval every interval_s; returns the rows."""
    rows, t0 = [], time.monotonic()
    last = t0
    while time.monotonic() - t0 < seconds - 0.5:
        await asyncio.sleep(min(interval_s, seconds - (time.monotonic() - t0)))
        iv, state["iv"] = state["iv"], Interval()
        now = time.monotonic()
        row = _row(now - t0, iv, now - last, _rss(pid))
        last = now
        rows.append(row)
        log(_format_row(row))
    state["stop"] = True
    return rows


def _format_row(r: dict) -> str:
    s = (f"{r['t_s']:>7.1f} s  {r['steps_per_s']:>9.1f} steps/s  p50 {r['p50_us']:>9.1f} us  "
         f"p99 {r['p99_us']:>9.1f} us  +{r['started']:>5} -{r['ended']:>5} sessions  "
         f"err {r['errors']:>4}  rss {r['rss_mib']:>7.1f} MiB")
    if "refused" in r:
        s += f"  refused {r['refused']} (p50 {r['refused_p50_us']} us, p99 {r['refused_p99_us']} us)"
    return s


# ---- soak -------------------------------------------------------------------------------------

async def _soak_worker(target, model, features, wid, state, min_steps, max_steps):
    rng = random.Random(wid)
    async with grpc.aio.insecure_channel(target) as ch:
        call = pb_grpc.InferenceStub(ch).StreamSteps()
        n = 0
        while not state["stop"]:
            sid, length = f"soak-{wid}-{n}", rng.randint(min_steps, max_steps)
            n += 1
            for t in range(length):
                if state["stop"]:
                    break
                x = [rng.gauss(0, 1) for _ in range(features)]
                msg = pb.StreamStepsRequest(steps=[_step(model, sid, x, start=t == 0,
                                                         end=t == length - 1, expect=t)])
                t0 = time.perf_counter_ns()
                await call.write(msg)
                r = (await call.read()).results[0]
                iv = state["iv"]
                if r.code:
                    iv.errors += 1
                    break
                iv.lat.append(time.perf_counter_ns() - t0)
                iv.started += t == 0
                iv.ended += t == length - 1
        await call.done_writing()


def soak(repo, model, minutes, interval_s, workers, min_steps, max_steps, log=print) -> dict:
    port = _free_port()
    proc = start_server(repo, port, "--max-sessions", "100000")
    target = f"127.0.0.1:{port}"
    try:
        features = _features(target, model)
        rss0 = _rss(proc.pid)
        state = {"iv": Interval(), "stop": False}

        async def run():
            tasks = [asyncio.ensure_future(_soak_worker(target, model, features, w, state,
                                                        min_steps, max_steps))
                     for w in range(workers)]
            rows = await _reporter(proc.pid, minutes * 60, interval_s, state, log)
            await asyncio.gather(*tasks)
            return rows

        log(f"soak: {workers} streams, sessions of {min_steps}-{max_steps} steps, "
            f"{minutes} min, a row every {interval_s} s")
        rows = asyncio.run(run())
        rss1 = _rss(proc.pid)
    finally:
        stop_server(proc)
    warm = rows[1:] if len(rows) > 2 else rows  # the first interval includes warm-up
    rss_w = warm[0]["rss_mib"]
    p99 = [r["p99_us"] for r in warm]
    third = max(1, len(p99) // 3)
    summary = {
        "sessions_started": sum(r["started"] for r in rows),
        "sessions_ended": sum(r["ended"] for r in rows),
        "steps": sum(r["steps"] for r in rows), "errors": sum(r["errors"] for r in rows),
        "rss_start_mib": round(rss0 / 2**20, 1), "rss_after_first_interval_mib": rss_w,
        "rss_end_mib": round(rss1 / 2**20, 1),
        "rss_end_over_after_first_interval": round(rss1 / 2**20 / rss_w, 3),
        "p99_first_third_median_us": round(float(np.median(p99[:third])), 1),
        "p99_last_third_median_us": round(float(np.median(p99[-third:])), 1),
    }
    return {"mode": "soak", "model": model, "minutes": minutes, "workers": workers,
            "rows": rows, "summary": summary}


def _features(target, model) -> int:
    from serving.client import Client

    with Client(target) as c:
        meta = c.metadata(model)
    if not meta.can_stream or meta.input_kind != "float":
        raise ValueError(f"model {model!r} must be a float-input streaming model for the soak")
    return meta.input_features


# ---- overload ---------------------------------------------------------------------------------

def _predict_request(model, features, batch=(32, 256), seed=0) -> bytes:
    """A serialized (B, T, features) Predict request: built once, so a client stays cheap."""
    x = np.random.default_rng(seed).normal(size=(*batch, features)).astype(np.float32)
    return pb.PredictRequest(model=model, x=pb.Tensor(shape=x.shape, float_data=x.ravel())).SerializeToString()


async def _timed_predict(predict, data, iv: Interval) -> bool:
    """One Predict; its latency goes to iv.lat or iv.refused (else iv.errors). True if refused."""
    t0 = time.perf_counter_ns()
    try:
        await predict(data, timeout=60)
        iv.lat.append(time.perf_counter_ns() - t0)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            iv.errors += 1
            return False
        iv.refused.append(time.perf_counter_ns() - t0)
        return True
    return False


async def _overload_load(target, model, features, concurrency, seconds, interval_s, pid, log):
    state = {"iv": Interval(), "stop": False}
    data = _predict_request(model, features)

    async def caller(k):
        async with grpc.aio.insecure_channel(target) as ch:
            predict = ch.unary_unary("/seqserve.v1.Inference/Predict")
            while not state["stop"]:
                if await _timed_predict(predict, data, state["iv"]):
                    await asyncio.sleep(0.005)  # a client backs off a little

    tasks = [asyncio.ensure_future(caller(k)) for k in range(concurrency)]
    rows = await _reporter(pid, seconds, interval_s, state, log)
    await asyncio.gather(*tasks)
    return rows


async def _probe(target, model, features, seconds, every_s=0.02) -> dict:
    """One Predict every `every_s` from a fresh, otherwise idle client: what a
    newcomer meets while the load runs (its latencies carry none of the load
    generator's own queueing)."""
    data = _predict_request(model, features, seed=1)
    iv = Interval()
    async with grpc.aio.insecure_channel(target) as ch:
        predict = ch.unary_unary("/seqserve.v1.Inference/Predict")
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            await _timed_predict(predict, data, iv)
            await asyncio.sleep(every_s)
    return {"ok_ns": iv.lat, "refused_ns": iv.refused, "errors": iv.errors}


def _start_probe(target, model, features, seconds, delay_s=2.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving.soak", "probe", target, model, str(features),
                             str(seconds), str(delay_s)], stdout=subprocess.PIPE, text=True)


def _probe_summary(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=120)
    got = json.loads(out)
    ok, refused = got["ok_ns"], got["refused_ns"]
    pct = lambda xs, q: _us(xs, q) if xs else None
    return {"ok": len(ok), "ok_p50_us": pct(ok, 50), "refused": len(refused),
            "refused_p50_us": pct(refused, 50), "refused_p99_us": pct(refused, 99),
            "errors": got["errors"]}


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(float(np.median(xs)), 1) if xs else None


def overload(repo, model, minutes, interval_s, concurrency, limit, log=print) -> dict:
    phases = {}
    for name, extra in (("unbounded", ["--max-predict-inflight", "100000"]),
                        ("bounded", ["--max-predict-inflight", str(limit),
                                     "--max-concurrent-rpcs", str(limit)])):
        port = _free_port()
        proc = start_server(repo, port, *extra)
        try:
            target = f"127.0.0.1:{port}"
            features = _features(target, model)
            log(f"overload, {name} ({' '.join(extra)}): {concurrency} concurrent Predict "
                f"callers, x (32, 256, {features})")
            seconds = minutes * 30
            probe = _start_probe(target, model, features, max(1.0, seconds - 4))
            rows = asyncio.run(_overload_load(target, model, features, concurrency,
                                              seconds, interval_s, proc.pid, log))
            probed = _probe_summary(probe)
            log(f"  probe (a separate idle client, one Predict per 20 ms): {probed}")
        finally:
            stop_server(proc)
        ok = [r for r in rows[1:] or rows]
        phases[name] = {
            "rows": rows,
            "ok_p50_us_median": round(float(np.median([r["p50_us"] for r in ok])), 1),
            "ok_p99_us_median": round(float(np.median([r["p99_us"] for r in ok])), 1),
            "refused": sum(r.get("refused", 0) for r in rows),
            "refused_p50_us_median": _median([r.get("refused_p50_us") for r in ok]),
            "refused_p99_us_median": _median([r.get("refused_p99_us") for r in ok]),
            "ok_steps_per_s_median": round(float(np.median([r["steps_per_s"] for r in ok])), 1),
            "probe": probed,
        }
    return {"mode": "overload", "model": model, "concurrency": concurrency, "limit": limit,
            "phases": phases}


# ---- kill -9 ----------------------------------------------------------------------------------

async def _kill9_load(target, model, features, sessions, seconds, acked):
    """Step `sessions` long-lived sessions for `seconds`; acked[sid] = [(time, position)]."""
    x = [0.1] * features
    stop = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as ch:
        call = pb_grpc.InferenceStub(ch).StreamSteps()
        pos = {f"k9-{i}": 0 for i in range(sessions)}
        while time.monotonic() < stop:
            msg = pb.StreamStepsRequest(steps=[_step(model, sid, x, start=p == 0, expect=p)
                                               for sid, p in pos.items()])
            await call.write(msg)
            reply = await call.read()
            now = time.time()
            for (sid, _), r in zip(list(pos.items()), reply.results):
                if r.code == 0:
                    pos[sid] = r.position
                    acked[sid].append((now, r.position))
            await asyncio.sleep(0.01)
        await call.done_writing()


async def _positions(target, model, features, sids) -> dict:
    """Each session's position, asked without moving it (a step for an impossible position)."""
    out = {}
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for sid in sids:
            try:
                await stub.Step(_step(model, sid, [0.0] * features, expect=1 << 60))
                raise RuntimeError("a step for an impossible position was applied")
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:
                    out[sid] = None  # the session did not survive
                    continue
                md = dict(exc.trailing_metadata() or ())
                out[sid] = int(md[POSITION_METADATA])
    return out


def kill9(repo, model, seconds, snapshot_s, sessions, log=print) -> dict:
    state_dir = tempfile.mkdtemp(prefix="seqserve-kill9-")
    port = _free_port()
    extra = ["--state-dir", state_dir, "--snapshot-s", str(snapshot_s)]
    proc = start_server(repo, port, *extra)
    target = f"127.0.0.1:{port}"
    acked: dict = {f"k9-{i}": [] for i in range(sessions)}
    try:
        features = _features(target, model)
        # kill at a random point between two snapshots, not in step with them
        seconds += random.uniform(0, snapshot_s)
        log(f"kill -9: {sessions} sessions stepping for {seconds:.2f} s, snapshots every "
            f"{snapshot_s} s")
        asyncio.run(_kill9_load(target, model, features, sessions, seconds, acked))
    finally:
        killed_at = time.time()
        proc.kill()  # SIGKILL: no final snapshot
        proc.wait()
    proc = start_server(repo, port, *extra)
    try:
        restored = asyncio.run(_positions(target, model, features, list(acked)))
    finally:
        stop_server(proc)
    lost_steps, lost_s = [], []
    for sid, history in acked.items():
        last = history[-1][1] if history else 0
        got = restored.get(sid)
        got = 0 if got is None else got
        lost_steps.append(last - got)
        # the time of the newest acknowledged step the restored state still holds
        held = [t for t, p in history if p <= got]
        lost_s.append(killed_at - (held[-1] if held else history[0][0]))
    steps_per_s = float(np.mean([h[-1][1] / max(1e-9, h[-1][0] - h[0][0]) for h in acked.values()
                                 if len(h) > 1]))
    return {"mode": "kill9", "model": model, "sessions": sessions, "seconds": round(seconds, 2),
            "snapshot_s": snapshot_s, "steps_per_session_per_s": round(steps_per_s, 1),
            "acked_steps": sum(h[-1][1] for h in acked.values() if h),
            "lost_steps_total": int(sum(lost_steps)), "lost_steps_max": int(max(lost_steps)),
            "lost_window_s_max": round(max(lost_s), 2),
            "lost_window_s_median": round(float(np.median(lost_s)), 2),
            "sessions_missing": sum(1 for v in restored.values() if v is None),
            "bound_held": max(lost_s) <= snapshot_s + 1.0 and
            all(v is not None for v in restored.values())}


# ---- command line -----------------------------------------------------------------------------

def _probe_main(argv: list[str]) -> int:
    target, model, features, seconds, delay = argv
    time.sleep(float(delay))  # let the load build up first
    print(json.dumps(asyncio.run(_probe(target, model, int(features), float(seconds)))))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["probe"]:
        return _probe_main(argv[1:])
    p = argparse.ArgumentParser(prog="seqserve bench soak", description=__doc__.splitlines()[0])
    p.add_argument("--repo", default="model_repository")
    p.add_argument("--model", default="sine-lstm")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--interval-s", type=float, default=10.0, help="seconds per reported row")
    p.add_argument("--workers", type=int, default=16, help="concurrent streams (soak)")
    p.add_argument("--min-steps", type=int, default=10, help="shortest session (soak)")
    p.add_argument("--max-steps", type=int, default=100, help="longest session (soak)")
    p.add_argument("--overload", action="store_true", help="the overload comparison instead")
    p.add_argument("--concurrency", type=int, default=48, help="Predict callers (overload)")
    p.add_argument("--limit", type=int, default=4, help="--max-predict-inflight (overload)")
    p.add_argument("--kill9", action="store_true", help="the kill -9 run instead")
    p.add_argument("--snapshot-s", type=float, default=2.0, help="snapshot interval (kill9)")
    p.add_argument("--sessions", type=int, default=200, help="long-lived sessions (kill9)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.interval_s <= 0 or a.workers <= 0:
        raise ValueError("--minutes, --interval-s and --workers must be positive")
    if not os.path.isdir(a.repo):
        raise ValueError(f"--repo {a.repo}: no such directory")
    log = (lambda *_: None) if a.json else print
    if a.overload:
        report = overload(a.repo, a.model, a.minutes, a.interval_s, a.concurrency, a.limit, log)
    elif a.kill9:
        report = kill9(a.repo, a.model, a.minutes * 60, a.snapshot_s, a.sessions, log)
    else:
        report = soak(a.repo, a.model, a.minutes, a.interval_s, a.workers, a.min_steps,
                      a.max_steps, log)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        rest = {k: v for k, v in report.items() if k not in ("rows", "phases")}
        if "phases" in report:
            rest["phases"] = {k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                              for k, v in report["phases"].items()}
        print(json.dumps(rest.get("summary", rest), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
