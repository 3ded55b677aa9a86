"""The CUDA cell against ONNX Runtime: under the simulator always (small sizes; it
runs kernels in Python at ~50 ms a launch), on a real GPU when there is one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("cuda_parity.py")
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4


def _run(paths, simulator: bool, steps: int, batch: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, paths), "--steps", str(steps),
                           "--batch", str(batch)], env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _models(model_file, hidden):
    return {
        "lstm-peephole": model_file("onnx", op="LSTM", layers=2, hidden=hidden, peephole=True),
        "gru-lbr0": model_file("onnx", op="GRU", layers=2, hidden=hidden, linear_before_reset=0),
        "gru-torch-normalised": model_file("torch", cell="gru", layers=1, hidden=hidden, features=2,
                                           normalize=True),
        "rnn-torch": model_file("torch", cell="rnn", layers=2, hidden=hidden, features=1),
        "lstm-tokens-softmax": model_file("torch", cell="lstm", layers=1, hidden=hidden, vocab=30,
                                          embed=6, out=4, activation="softmax"),
    }


def _check(results, models):
    for name, path in models.items():
        r = results[str(path)]
        assert r["device"] == "cuda", name
        assert r["state_ops"], name
        worst = max(v for k, v in r.items() if k in ("y", "hn", "cn"))
        assert worst <= TOL, (name, r)


def test_cuda_simulator_parity(model_file):
    models = _models(model_file, hidden=8)
    _check(_run(models.values(), simulator=True, steps=4, batch=2), models)


def _real_gpu() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM"):
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available()) and len(cuda.gpus) > 0
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _real_gpu(), reason="needs a real CUDA GPU")
def test_cuda_gpu_parity(model_file):
    models = _models(model_file, hidden=128)
    _check(_run(models.values(), simulator=False, steps=200, batch=64), models)
