"""`seqserve bench cells`: one streaming step, every engine, on the same model.

The model is the issue's reference: LSTM, 2 layers, hidden 128, 1 input, one
output (training.model.SequenceModel exported by training/export.py, so every
engine reads the same weights). For each engine and batch size B we time one
call that advances B sessions by one step with their state carried between
calls, and report the median per call (`step_us`) and session-steps per second
(`steps_per_s` = B / median).

  numba-cpu      numba_cells Cell.step (state resident in slot arrays); at B=1
                 Cell.step_one, the call the server makes for a lone step
  ort-run        ONNX Runtime run() with T=1, state fed in and read out each call
  ort-iobinding  the same with IO binding (state stays in OrtValues, swapped)
  torch          PyTorch eager nn.LSTM + head, T=1, inference_mode
  numba-cuda, ort-cuda, torch-cuda   the same on a GPU, when there is one

All engines run on one core by default (--threads 1): the Numba cell is
single-threaded, and on a shared machine torch's default thread pool can spin
against other processes (we saw a batch-1 torch step take 76 ms with 2
threads on 2 loaded cores). --threads 0 gives each library its default.

torch is imported lazily: only the torch engines and the export need it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = dict(cell="lstm", input_size=1, hidden=128, layers=2, head="regression", output_size=1)


def build_model(path: Path):
    """Export the reference model to `path`; returns the torch model (or None without torch)."""
    import torch

    from training.export import build_onnx
    from training.model import Checkpoint, ModelConfig, SequenceModel

    torch.manual_seed(0)
    config = ModelConfig(**MODEL)
    model = SequenceModel(config).eval()
    ckpt = Checkpoint(model=config.to_dict(), task={"name": "bench"}, train={})
    path.write_bytes(build_onnx(model, ckpt, source_run="bench").SerializeToString())
    return model


def _time(fn, budget_s: float, max_calls: int) -> float:
    """Median seconds per call after a short warm-up."""
    for _ in range(3):
        fn()
    times = []
    end = time.perf_counter() + budget_s
    while len(times) < max_calls and (len(times) < 5 or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- engines
# each returns a zero-argument callable that advances B sessions by one step

def numba_engine(path, B, device):
    from numba_cells import load_cell

    cell = load_cell(path, device=device, capacity=max(B, 1))
    slots = np.arange(B, dtype=np.int64)
    x = np.random.default_rng(0).standard_normal((B, 1)).astype(np.float32)
    if B == 1:  # a lone step: the call the server makes for it
        return lambda: cell.step_one(x, 0)
    return lambda: cell.step(x, slots)


THREADS = [1]  # intra-op threads for ORT and torch (set by --threads)


def _ort_session(path, cuda):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS[0]
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda
                 else ["CPUExecutionProvider"])
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if cuda and sess.get_providers()[0] != "CUDAExecutionProvider":
        return None
    return sess


def ort_run_engine(path, B, cuda=False):
    sess = _ort_session(path, cuda)
    if sess is None:
        return None
    L, H = MODEL["layers"], MODEL["hidden"]
    feeds = {"x": np.random.default_rng(0).standard_normal((B, 1, 1)).astype(np.float32),
             "h0": np.zeros((L, B, H), np.float32), "c0": np.zeros((L, B, H), np.float32)}

    def step():
        _, feeds["h0"], feeds["c0"] = sess.run(None, feeds)  # state out -> next state in
    return step


def ort_iobinding_engine(path, B):
    import onnxruntime as ort

    sess = _ort_session(path, False)
    L, H = MODEL["layers"], MODEL["hidden"]
    x = ort.OrtValue.ortvalue_from_numpy(
        np.random.default_rng(0).standard_normal((B, 1, 1)).astype(np.float32))
    y = ort.OrtValue.ortvalue_from_numpy(np.zeros((B, 1, 1), np.float32))
    state = [[ort.OrtValue.ortvalue_from_numpy(np.zeros((L, B, H), np.float32)) for _ in range(2)]
             for _ in range(2)]  # two (h, c) pairs: read one, write the other, swap
    bindings = []
    for src, dst in ((0, 1), (1, 0)):
        b = sess.io_binding()
        b.bind_ortvalue_input("x", x)
        b.bind_ortvalue_input("h0", state[src][0])
        b.bind_ortvalue_input("c0", state[src][1])
        b.bind_ortvalue_output("y", y)
        b.bind_ortvalue_output("hn", state[dst][0])
        b.bind_ortvalue_output("cn", state[dst][1])
        bindings.append(b)
    turn = [0]

    def step():
        sess.run_with_iobinding(bindings[turn[0]])
        turn[0] ^= 1
    return step


def torch_engine(model, B, cuda=False):
    import torch

    if cuda and not torch.cuda.is_available():
        return None
    dev = torch.device("cuda" if cuda else "cpu")
    rnn, head = copy.deepcopy(model.rnn).to(dev), copy.deepcopy(model.head).to(dev)
    L, H = MODEL["layers"], MODEL["hidden"]
    x = torch.randn(B, 1, 1, device=dev)
    state = [(torch.zeros(L, B, H, device=dev), torch.zeros(L, B, H, device=dev))]

    def step():
        with torch.inference_mode():
            out, state[0] = rnn(x, state[0])  # (B, 1, H)
            head(out)
            if cuda:
                torch.cuda.synchronize()
    return step


def run(batches, budget_s, max_calls, gpu, path=None, quiet=False):
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "bench-lstm.onnx"
    model = build_model(Path(path))
    import torch

    torch.set_num_threads(THREADS[0] or os.cpu_count() or 1)
    rows = []
    engines = [("numba-cpu", lambda B: numba_engine(path, B, "cpu")),
               ("ort-run", lambda B: ort_run_engine(path, B)),
               ("ort-iobinding", lambda B: ort_iobinding_engine(path, B)),
               ("torch", lambda B: torch_engine(model, B))]
    if gpu:
        engines += [("numba-cuda", lambda B: numba_engine(path, B, "cuda")),
                    ("ort-cuda", lambda B: ort_run_engine(path, B, cuda=True)),
                    ("torch-cuda", lambda B: torch_engine(model, B, cuda=True))]
    for B in batches:
        for name, make in engines:
            step = make(B)
            if step is None:
                continue
            sec = _time(step, budget_s, max_calls)
            rows.append({"engine": name, "batch": B, "step_us": round(sec * 1e6, 2),
                         "steps_per_s": round(B / sec, 1)})
            if not quiet:
                print(f"  {name:<14} B={B:<5} {sec * 1e6:10.1f} us", file=sys.stderr, flush=True)
    if tmp is not None:
        tmp.cleanup()
    return rows


def table(rows) -> str:
    lines = [f"{'engine':<14} {'batch':>6} {'step_us':>10} {'steps_per_s':>13} {'vs numba-cpu':>13}"]
    base = {r["batch"]: r["step_us"] for r in rows if r["engine"] == "numba-cpu"}
    for r in rows:
        ratio = r["step_us"] / base[r["batch"]] if r["batch"] in base else float("nan")
        lines.append(f"{r['engine']:<14} {r['batch']:>6} {r['step_us']:>10.1f} "
                     f"{r['steps_per_s']:>13,.0f} {ratio:>12.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="seqserve bench cells", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--batches", default="1,64,1024", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=2000, help="most timed calls per engine and batch")
    p.add_argument("--seconds", type=float, default=2.0, help="time budget per engine and batch")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for ONNX Runtime and torch (default 1, like the Numba "
                        "cell; 0: each library's default, all cores)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU engines even with a GPU")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches must be positive integers, got {args.batches!r}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    THREADS[0] = args.threads
    if args.steps < 5:
        raise ValueError(f"--steps must be at least 5, got {args.steps}")
    try:
        import torch  # noqa: F401  (the export and the torch engine need it)
    except ImportError:
        raise ValueError("bench cells needs torch (pip install seqserve[train])") from None
    from numba_cells import cuda_available

    gpu = not args.no_gpu and cuda_available(simulator_ok=False)
    rows = run(batches, args.seconds, args.steps, gpu)
    if args.json:  # the table goes to stderr so stdout parses as JSON
        print(table(rows), file=sys.stderr)
        print(json.dumps(rows))
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
