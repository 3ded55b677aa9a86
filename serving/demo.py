"""`make demo`: the whole serving story in one command.

Starts `seqserve serve` in its own process, streams a held-out sine wave to
it one step at a time over StreamSteps, asks for a 100-step closed-loop
Rollout from the session's state, writes a PNG of truth vs streamed
one-step-ahead predictions and the rollout, and shuts the server down.

  python -m serving.demo --repo model_repository --model sine-lstm --out reports/demo
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from seqserve.synthetic import sine_series


def held_out_sine(length: int, seed: int = 20261122) -> np.ndarray:
    """A wave of the sine task's family with a seed the training run never used."""
    return sine_series(length, seed).astype(np.float32)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(path: Path, truth, streamed, rollout, n_stream: int, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2))
    t = np.arange(len(truth))
    ax.plot(t, truth, color="black", lw=1.2, label="truth (held-out wave)")
    # y_t is the forecast of x_{t+1}: plot it one step later
    ax.plot(t[1:n_stream + 1], streamed, color="tab:blue", lw=1.0, ls="--",
            label="streamed one-step-ahead predictions (StreamSteps)")
    # the rollout feeds back the last streamed forecast (of step n_stream),
    # so its first output forecasts step n_stream + 1
    ax.plot(t[n_stream + 1:n_stream + 1 + len(rollout)], rollout, color="tab:red", lw=1.6,
            label=f"{len(rollout)}-step closed-loop rollout (Rollout)")
    ax.axvline(n_stream - 0.5, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("time step")
    ax.set_ylabel("value")
    ax.set_title(f"seqserve demo: {model} served over gRPC, streamed step by step, then rolled out")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default="model_repository")
    p.add_argument("--model", default="sine-lstm")
    p.add_argument("--out", default="reports/demo")
    p.add_argument("--steps", type=int, default=300, help="steps streamed before the rollout")
    p.add_argument("--rollout", type=int, default=100)
    a = p.parse_args(argv)

    from serving.client import Client

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    target = f"127.0.0.1:{port}"
    log = open(out / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "seqserve", "serve", "--repo", a.repo, "--port", str(port),
         "--metrics-port", "0"], stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        with Client(target) as client:
            print(f"server starting on {target} (log: {out / 'server.log'})")
            client.wait_ready(timeout=300)
            meta = client.metadata(a.model)
            print(f"model {meta.name} v{meta.version}: {meta.cell} {meta.layers}x{meta.hidden}, "
                  f"ONNX Runtime {meta.ort_provider}, cell {meta.cell_device}")
            if meta.input_features != 1 or meta.output_size != 1:
                raise ValueError(f"the demo needs a univariate forecaster; {a.model} has "
                                 f"{meta.input_features} inputs and {meta.output_size} outputs")
            truth = held_out_sine(a.steps + a.rollout + 1)
            streamed, lat = [], []
            with client.stream(a.model) as stream:
                for t in range(a.steps):
                    t0 = time.perf_counter()
                    y, _ = stream.step("demo", [float(truth[t])], start=(t == 0))
                    lat.append(time.perf_counter() - t0)
                    streamed.append(float(y[0, 0]))
            rollout, pos = client.rollout(a.model, "demo", steps=a.rollout)
            client.end_session(a.model, "demo")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    streamed = np.array(streamed)  # streamed[t] forecasts truth[t + 1]
    rollout = rollout[:, 0]  # rollout[k] forecasts truth[steps + 1 + k]
    one_step_mae = float(np.abs(streamed[50:] - truth[51:a.steps + 1]).mean())
    rollout_mae = float(np.abs(rollout - truth[a.steps + 1:a.steps + 1 + a.rollout]).mean())
    png = out / "demo.png"
    plot(png, truth, streamed, rollout, a.steps, a.model)
    print(f"streamed {a.steps} steps: median round trip {np.median(lat) * 1e6:.0f} us "
          f"(blocking client), one-step MAE after warm-up {one_step_mae:.4f}")
    print(f"rollout {a.rollout} steps: MAE {rollout_mae:.4f} (wave amplitude "
          f"{np.abs(truth).max():.2f})")
    print(f"wrote {png}; server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
