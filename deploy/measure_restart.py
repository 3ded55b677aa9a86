"""Measure what a restart costs: SIGTERM -> exit (snapshot written), and start
-> SERVING with every session restored, for growing numbers of live sessions.

What `stop_grace_period` and the health check's `start_period` in
docker-compose.yml must cover. Prints a table, and with --json a JSON list
of rows {"sessions", "snapshot_mb", "stop_s", "start_s", "restored_ok"}.

    python deploy/measure_restart.py --repo model_repository --model sine-lstm \
        --sessions 1000 10000 100000 [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from serving.client import Client, step_request

PER_MESSAGE = 1000  # sessions per StreamSteps message (under the server's 4096 steps cap)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(repo: str, state: Path, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    """Start `seqserve serve`; (process, seconds until health says SERVING)."""
    cmd = [sys.executable, "-m", "seqserve", "serve", "--repo", repo, "--port", str(port),
           "--metrics-port", "0", "--state-dir", str(state), "--snapshot-s", "0"]
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    with Client(f"127.0.0.1:{port}") as c:
        c.wait_ready(timeout=600)
    return proc, time.perf_counter() - t0


def _open_sessions(port: int, model: str, n: int, features: int, rng) -> None:
    with Client(f"127.0.0.1:{port}") as c, c.stream(model) as s:
        for lo in range(0, n, PER_MESSAGE):
            ids = range(lo + 1, min(n, lo + PER_MESSAGE) + 1)
            x = rng.standard_normal((len(ids), features)).astype(np.float32)
            for r in s.send([step_request(model, i, x[k], start=True) for k, i in enumerate(ids)]):
                if r.code:
                    raise RuntimeError(f"start refused: {r.error}")


def _check_restored(port: int, model: str, n: int, features: int, sample: int = 200) -> bool:
    """A sample of sessions continues (position 2) without `start`."""
    ids = np.unique(np.linspace(1, n, num=min(n, sample)).astype(int)).tolist()
    with Client(f"127.0.0.1:{port}") as c, c.stream(model) as s:
        results = s.send([step_request(model, i, np.zeros(features, np.float32)) for i in ids])
    return all(r.code == 0 and r.position == 2 for r in results)


def measure(repo: str, model: str, n: int, workdir: Path) -> dict:
    state, log, port = workdir / f"state-{n}", workdir / f"server-{n}.log", _free_port()
    state.mkdir()
    proc, _ = _start(repo, state, port, log)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            features = c.metadata(model).input_features
        _open_sessions(port, model, n, features, np.random.default_rng(0))
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=600)
        stop_s = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    if code != 0:
        raise RuntimeError(f"server exited {code} on SIGTERM; see {log}")
    snapshot_mb = sum(p.stat().st_size for p in state.glob("*.npz")) / 1e6
    proc, start_s = _start(repo, state, port, log)
    try:
        ok = _check_restored(port, model, n, features)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    return {"sessions": n, "snapshot_mb": round(snapshot_mb, 2), "stop_s": round(stop_s, 2),
            "start_s": round(start_s, 2), "restored_ok": ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="measure_restart.py", description=__doc__.split("\n")[0])
    p.add_argument("--repo", default="model_repository")
    p.add_argument("--model", default="sine-lstm")
    p.add_argument("--sessions", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = p.parse_args(argv)
    if not Path(args.repo, args.model).is_dir():
        print(f"measure_restart.py: no model {args.model!r} in {args.repo!r}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="seqserve-restart-") as tmp:
        for n in args.sessions:
            rows.append(measure(args.repo, args.model, n, Path(tmp)))
            r = rows[-1]
            print(f"{r['sessions']:>9} sessions  snapshot {r['snapshot_mb']:>8.2f} MB  "
                  f"SIGTERM->exit {r['stop_s']:>6.2f} s  start->SERVING {r['start_s']:>6.2f} s  "
                  f"restored {'ok' if r['restored_ok'] else 'FAILED'}", flush=True)
    print(f"\n| sessions | snapshot MB | SIGTERM -> exit s | start -> SERVING s | restored |")
    print("|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(f"| {r['sessions']} | {r['snapshot_mb']} | {r['stop_s']} | {r['start_s']} | "
              f"{'ok' if r['restored_ok'] else 'FAILED'} |")
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["restored_ok"] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
