"""Parity of the CUDA cell with ONNX Runtime, run in its own process.

    NUMBA_ENABLE_CUDASIM=1 python tests/numba_cells/cuda_parity.py MODEL.onnx ... [--steps T --batch B]

The simulator must be chosen before numba is imported, so the tests start this
script in a subprocess instead of flipping it inside the pytest process (where
the CPU tests have already imported numba). Prints one JSON object:
{path: {"device", "y", "hn", "cn"?, "state_ops"}} with max-abs errors.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort

from numba_cells import load_cell


def check(path: str, B: int, T: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cell = load_cell(path, device="cuda", capacity=2 * B)
    s = cell.spec
    slots = rng.permutation(2 * B)[:B].astype(np.int64)
    if s.input_kind == "tokens":
        x = rng.integers(0, s.input_features, (B, T), dtype=np.int64)
    else:
        x = rng.standard_normal((B, T, s.input_features)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((s.layers, B, s.hidden))).astype(np.float32)
    c0 = (0.5 * rng.standard_normal((s.layers, B, s.hidden))).astype(np.float32)
    feeds = {"x": x, "h0": h0}
    if s.has_cell_state:
        feeds["c0"] = c0
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    for b, slot in enumerate(slots):
        cell.reset(slot, h0[:, b], c0[:, b] if s.has_cell_state else None)

    # sessions start one tick apart and share batches; the second half goes as one chunk
    got = np.zeros(want[0].shape, np.float32)
    half, pos, tick = T // 2, np.zeros(B, int), 0
    while (pos < half).any():
        rows = [b for b in range(B) if b <= tick and pos[b] < half][::-1]
        y = cell.step(np.stack([x[b, pos[b]] for b in rows]), slots[rows])
        for i, b in enumerate(rows):
            got[b, pos[b]] = y[i]
            pos[b] += 1
        tick += 1
    got[:, half:] = cell.step_chunk(x[:, half:], slots)
    out = {"device": cell.device, "y": float(np.abs(got - want[0]).max())}
    states = cell.read_many(slots)
    out["hn"] = float(np.abs(states["h"].transpose(1, 0, 2) - want[1]).max())
    if s.has_cell_state:
        out["cn"] = float(np.abs(states["c"].transpose(1, 0, 2) - want[2]).max())

    # state operations on device arrays: copy, grow, write/read, reset
    free = int(np.setdiff1d(np.arange(2 * B), slots)[0])
    cell.copy(int(slots[0]), free)
    ok = np.array_equal(cell.read(free)["h"], cell.read(int(slots[0]))["h"])
    before = cell.read_many(np.arange(2 * B))["h"]
    cell.grow(2 * B + 3)
    after = cell.read_many(np.arange(2 * B + 3))["h"]
    ok &= np.array_equal(after[: 2 * B], before) and not after[2 * B:].any()
    h = rng.standard_normal((s.layers, s.hidden)).astype(np.float32)
    c = h[::-1].copy() if s.has_cell_state else None
    cell.write(2 * B + 1, h, c)
    ok &= np.array_equal(cell.read(2 * B + 1)["h"], h)
    cell.reset(2 * B + 1)
    ok &= not cell.read(2 * B + 1)["h"].any()
    out["state_ops"] = bool(ok)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=3)
    args = p.parse_args(argv)
    print(json.dumps({m: check(m, args.batch, args.steps) for m in args.models}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
