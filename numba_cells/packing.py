"""Pack a CellSpec into one flat float32 buffer plus an int64 table of offsets.

Kernels get two arrays instead of twenty: every array argument costs time in
Numba's dispatcher (and a launch argument on the GPU), which matters at batch 1.
Matrices are stored transposed, (inputs, outputs) row-major, so the kernels'
inner loop runs over contiguous output columns (see cpu.py for why).
"""
from __future__ import annotations

import numpy as np

from numba_cells.onnx_model import ACTIVATIONS, CellSpec

# meta slots (module constants: Numba freezes them as compile-time ints)
M_LAYERS, M_HIDDEN, M_IN, M_OUT, M_TOKENS, M_VOCAB, M_ACT, M_PEEP, M_LBR = range(9)
M_IN_SCALE, M_IN_SHIFT, M_EMB, M_HEAD_W, M_HEAD_B, M_OUT_SCALE, M_OUT_SHIFT = range(9, 16)
M_LAYER0 = 16
PER_LAYER = 6
# per-layer offsets: input weights, recurrent weights, GRU candidate recurrent weights,
# bias, GRU candidate recurrent bias, peepholes
L_W, L_R, L_RH, L_B, L_RBH, L_P = range(PER_LAYER)


def pack(spec: CellSpec) -> tuple[np.ndarray, np.ndarray]:
    chunks: list[np.ndarray] = []
    size = 0

    def put(a) -> int:
        nonlocal size
        if a is None:
            return -1
        a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
        chunks.append(a)
        off = size
        size += a.size
        return off

    H, G = spec.hidden, spec.gates
    meta = np.full(M_LAYER0 + PER_LAYER * spec.layers, -1, np.int64)
    meta[M_LAYERS], meta[M_HIDDEN], meta[M_IN] = spec.layers, H, spec.core_input
    meta[M_OUT] = spec.output_size
    meta[M_TOKENS] = int(spec.embedding is not None)
    meta[M_VOCAB] = spec.embedding.shape[0] if spec.embedding is not None else 0
    meta[M_ACT] = ACTIVATIONS.get(spec.activation, 0)
    meta[M_PEEP] = int(spec.has_peepholes)
    meta[M_IN_SCALE], meta[M_IN_SHIFT] = put(spec.in_scale), put(spec.in_shift)
    meta[M_EMB] = put(spec.embedding)
    meta[M_HEAD_W] = put(spec.head_W.T)  # (H, out)
    meta[M_HEAD_B] = put(spec.head_b)
    meta[M_OUT_SCALE], meta[M_OUT_SHIFT] = put(spec.out_scale), put(spec.out_shift)
    lbr = {lw.linear_before_reset for lw in spec.layer_weights}
    if spec.cell == "gru" and len(lbr) > 1:
        # one flag for all layers keeps the kernels simple; torch never mixes them
        from numba_cells.onnx_model import CellError
        raise CellError("GRU layers mix linear_before_reset 0 and 1: not supported")
    meta[M_LBR] = lbr.pop() if spec.cell == "gru" else 0
    for l, lw in enumerate(spec.layer_weights):
        base = M_LAYER0 + PER_LAYER * l
        meta[base + L_W] = put(lw.W.T)  # (in, G*H)
        bias = lw.Wb + lw.Rb
        if spec.cell == "gru":
            meta[base + L_R] = put(lw.R[: 2 * H].T)  # (H, 2H): z, r
            meta[base + L_RH] = put(lw.R[2 * H:].T)  # (H, H): candidate
            bias[2 * H:] = lw.Wb[2 * H:]  # the candidate's Rb is applied with (or inside) r
            meta[base + L_RBH] = put(lw.Rb[2 * H:])
        else:
            meta[base + L_R] = put(lw.R.T)  # (H, G*H)
        meta[base + L_B] = put(bias)
        if spec.cell == "lstm":
            meta[base + L_P] = put(lw.P if lw.P is not None else np.zeros(3 * H, np.float32))
    params = np.concatenate(chunks) if chunks else np.zeros(1, np.float32)
    return params, meta
