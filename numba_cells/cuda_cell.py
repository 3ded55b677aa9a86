"""CUDA kernels and device-resident slot arrays.

Weights (the packed buffer of packing.py) and the slot arrays h, c live on the
GPU for the cell's lifetime; a step moves only x (or token ids), the slot
indices and y across the bus. One thread block advances one session (row)
through every layer of every step: thread j owns hidden unit j, the layer's
input and the previous hidden vector sit in shared memory, and the weights'
(inputs, outputs) layout makes neighbouring threads read neighbouring words.

Gate math comes from scalar.py, the same functions the CPU kernels call.
Tested here only under NUMBA_ENABLE_CUDASIM=1 (no GPU on the build machine);
the `gpu`-marked test runs the same parity checks on a real device.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from numba_cells.onnx_model import CellError, CellSpec
from numba_cells.packing import (L_B, L_P, L_R, L_RBH, L_RH, L_W, M_ACT, M_EMB, M_HEAD_B,
                                 M_HEAD_W, M_HIDDEN, M_IN, M_IN_SCALE, M_IN_SHIFT, M_LAYER0,
                                 M_LAYERS, M_LBR, M_OUT, M_OUT_SCALE, M_OUT_SHIFT, M_TOKENS,
                                 PER_LAYER, pack)
from numba_cells.scalar import (ACT_LOGSOFTMAX, ACT_SOFTMAX, activate, exp32, gru_unit, lstm_unit,
                                sigmoid, tanh)

SHARED = 4096  # floats of shared memory per block (16 KiB): input, h_prev, r*h
MAX_THREADS = 1024
CELL_CODES = {"rnn": 0, "lstm": 1, "gru": 2}


@cuda.jit(device=True)
def _load_input(row, t, x, tok, params, meta, sh, j, nthreads):
    """Layer 0's input for one row -> sh[0:F]."""
    F = meta[M_IN]
    if meta[M_TOKENS]:
        base = meta[M_EMB] + tok[row, t] * F
        for k in range(j, F, nthreads):
            sh[k] = params[base + k]
    elif meta[M_IN_SCALE] >= 0:
        osc, osh = meta[M_IN_SCALE], meta[M_IN_SHIFT]
        for k in range(j, F, nthreads):
            sh[k] = x[row, t, k] * params[osc + k] + params[osh + k]
    else:
        for k in range(j, F, nthreads):
            sh[k] = x[row, t, k]


@cuda.jit(device=True)
def _head(row, t, y, params, meta, sh, j, nthreads):
    """y[row, t] from the last layer's h in sh[0:H]; softmax by thread 0."""
    H, O = meta[M_HIDDEN], meta[M_OUT]
    ow, ob, act = meta[M_HEAD_W], meta[M_HEAD_B], meta[M_ACT]
    for o in range(j, O, nthreads):
        acc = params[ob + o]
        for k in range(H):
            acc += sh[k] * params[ow + k * O + o]
        if act != ACT_SOFTMAX and act != ACT_LOGSOFTMAX:
            acc = activate(acc, act)
            if meta[M_OUT_SCALE] >= 0:
                acc = acc * params[meta[M_OUT_SCALE] + o] + params[meta[M_OUT_SHIFT] + o]
        y[row, t, o] = acc
    if act == ACT_SOFTMAX or act == ACT_LOGSOFTMAX:
        cuda.syncthreads()  # every logit written before one thread normalises the row
        if j == 0:
            m = y[row, t, 0]
            for o in range(1, O):
                m = max(m, y[row, t, o])
            total = float32(0.0)
            for o in range(O):
                total += exp32(y[row, t, o] - m)
            for o in range(O):
                v = y[row, t, o]
                v = exp32(v - m) / total if act == ACT_SOFTMAX else v - m - math.log(total)
                if meta[M_OUT_SCALE] >= 0:
                    v = v * params[meta[M_OUT_SCALE] + o] + params[meta[M_OUT_SHIFT] + o]
                y[row, t, o] = v


@cuda.jit
def step_kernel(cell, x, tok, slots, h, c, y, params, meta, T):
    """grid (B,), block (threads,): row b = blockIdx.x advances slot slots[b] by T steps."""
    sh = cuda.shared.array(SHARED, float32)
    row = cuda.blockIdx.x
    j = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    s = slots[row]
    L, H = meta[M_LAYERS], meta[M_HIDDEN]
    W = max(meta[M_IN], H)  # sh: [0, W) layer input, [W, W+H) h_prev, [W+H, W+2H) r*h
    for t in range(T):
        _load_input(row, t, x, tok, params, meta, sh, j, nthreads)
        width = meta[M_IN]
        for l in range(L):
            lb = M_LAYER0 + PER_LAYER * l
            if j < H:
                sh[W + j] = h[s, l, j]
            cuda.syncthreads()
            hn = z = r = gn = float32(0.0)
            if cell == 1 and j < H:  # LSTM, gates i, o, f, c
                G = 4 * H
                ob, ow, orr, op = meta[lb + L_B], meta[lb + L_W], meta[lb + L_R], meta[lb + L_P]
                gi, go = params[ob + j], params[ob + H + j]
                gf, gc = params[ob + 2 * H + j], params[ob + 3 * H + j]
                for k in range(width):
                    v = sh[k]
                    base = ow + k * G + j
                    gi += params[base] * v
                    go += params[base + H] * v
                    gf += params[base + 2 * H] * v
                    gc += params[base + 3 * H] * v
                for k in range(H):
                    v = sh[W + k]
                    base = orr + k * G + j
                    gi += params[base] * v
                    go += params[base + H] * v
                    gf += params[base + 2 * H] * v
                    gc += params[base + 3 * H] * v
                hn, cn = lstm_unit(gi, go, gf, gc, c[s, l, j],
                                   params[op + j], params[op + H + j], params[op + 2 * H + j])
                c[s, l, j] = cn
            elif cell == 2 and j < H:  # GRU, gates z, r, h
                G = 3 * H
                ob, ow, orr = meta[lb + L_B], meta[lb + L_W], meta[lb + L_R]
                gz, gr, gn = params[ob + j], params[ob + H + j], params[ob + 2 * H + j]
                for k in range(width):
                    v = sh[k]
                    base = ow + k * G + j
                    gz += params[base] * v
                    gr += params[base + H] * v
                    gn += params[base + 2 * H] * v
                for k in range(H):
                    v = sh[W + k]
                    base = orr + k * 2 * H + j
                    gz += params[base] * v
                    gr += params[base + H] * v
                z, r = sigmoid(gz), sigmoid(gr)
                sh[W + H + j] = r * sh[W + j]
            elif cell == 0 and j < H:  # RNN
                ob, ow, orr = meta[lb + L_B], meta[lb + L_W], meta[lb + L_R]
                a = params[ob + j]
                for k in range(width):
                    a += params[ow + k * H + j] * sh[k]
                for k in range(H):
                    a += params[orr + k * H + j] * sh[W + k]
                hn = tanh(a)
            if cell == 2:
                cuda.syncthreads()  # r * h_prev complete for linear_before_reset=0
                if j < H:
                    orh = meta[lb + L_RH]
                    cand = params[meta[lb + L_RBH] + j]
                    lbr = meta[M_LBR]
                    for k in range(H):
                        v = sh[W + k] if lbr else sh[W + H + k]
                        cand += params[orh + k * H + j] * v
                    n = tanh(gn + r * cand) if lbr else tanh(gn + cand)
                    hn = gru_unit(z, n, sh[W + j])
            if j < H:
                h[s, l, j] = hn
            cuda.syncthreads()  # all reads of this layer's input done
            if j < H:
                sh[j] = hn
            cuda.syncthreads()
            width = H
        _head(row, t, y, params, meta, sh, j, nthreads)
        cuda.syncthreads()  # the head has read sh before the next step overwrites it


@cuda.jit
def _copy_slot(h, src, dst):
    l, k = cuda.grid(2)
    if l < h.shape[1] and k < h.shape[2]:
        h[dst, l, k] = h[src, l, k]


class CudaState:
    """Slot arrays and weights on the GPU; the same interface as cell._CpuState."""

    device = "cuda"

    def __init__(self, spec: CellSpec, capacity: int):
        self.spec = spec
        params, meta = pack(spec)
        H = spec.hidden
        need = max(spec.core_input, H) + 2 * H
        if H > MAX_THREADS or need > SHARED:
            raise CellError(f"the CUDA cell supports hidden <= {MAX_THREADS} and input + 2*hidden "
                            f"<= {SHARED} (got hidden={H}, input={spec.core_input}): use device='cpu'")
        self.meta_host = meta
        self.params = cuda.to_device(params)
        self.meta = cuda.to_device(meta)
        self.cell_code = CELL_CODES[spec.cell]
        self.threads = min(MAX_THREADS, max(32, -(-max(H, 1) // 32) * 32))
        shape = (capacity, spec.layers, H)
        self.h = cuda.to_device(np.zeros(shape, np.float32))
        self.c = cuda.to_device(np.zeros(shape if spec.has_cell_state else (1, 1, 1), np.float32))
        self.seen = np.zeros(capacity, np.uint8)
        self._dummy_x = cuda.to_device(np.zeros((1, 1, 1), np.float32))
        self._dummy_tok = cuda.to_device(np.zeros((1, 1), np.int64))
        self._host_tok = np.zeros((1, 1), np.int64)

    def advance(self, x, tok, slots, B, T):
        from numba_cells.cpu import check_batch  # host-side checks: a kernel cannot raise

        code, row = check_batch(slots, self._host_tok if tok is None else tok, self.seen, self.meta_host)
        if code:
            return None, code, row
        y = cuda.device_array((B, T, self.spec.output_size), np.float32)
        xd = self._dummy_x if x is None else cuda.to_device(x)
        td = self._dummy_tok if tok is None else cuda.to_device(tok)
        step_kernel[B, self.threads](self.cell_code, xd, td, cuda.to_device(slots), self.h, self.c,
                                     y, self.params, self.meta, T)
        return y.copy_to_host(), 0, 0

    def warm_up(self):
        """Compile the kernels now, on a scratch slot array, not on a client's first step."""
        spec = self.spec
        h = cuda.to_device(np.zeros((1, spec.layers, spec.hidden), np.float32))
        c = cuda.to_device(np.zeros((1, spec.layers, spec.hidden) if spec.has_cell_state else (1, 1, 1),
                                    np.float32))
        x = self._dummy_x if spec.input_kind == "tokens" else cuda.to_device(
            np.zeros((1, 1, spec.input_features), np.float32))
        y = cuda.device_array((1, 1, spec.output_size), np.float32)
        step_kernel[1, self.threads](self.cell_code, x, self._dummy_tok, cuda.to_device(
            np.zeros(1, np.int64)), h, c, y, self.params, self.meta, 1)
        _copy_slot[(1, 1), (spec.layers, 1)](h, 0, 0)
        cuda.synchronize()

    # state access: whole-slot copies between host and device
    def _arrays(self):
        return (self.h, self.c) if self.spec.has_cell_state else (self.h,)

    def get(self, slot):
        if np.ndim(slot):  # many slots: one transfer of the whole array is simplest
            idx = np.asarray(slot)
            out = {"h": self.h.copy_to_host()[idx]}
            if self.spec.has_cell_state:
                out["c"] = self.c.copy_to_host()[idx]
            return out
        out = {"h": self.h[slot].copy_to_host()}
        if self.spec.has_cell_state:
            out["c"] = self.c[slot].copy_to_host()
        return out

    def set(self, slot, h, c):
        if np.ndim(slot):
            for i, s in enumerate(np.asarray(slot).tolist()):
                self.set(s, h[i], None if c is None else c[i])
            return
        self.h[slot].copy_to_device(np.ascontiguousarray(h, np.float32))
        if c is not None:
            self.c[slot].copy_to_device(np.ascontiguousarray(c, np.float32))

    def zero(self, slot):
        zeros = np.zeros((self.spec.layers, self.spec.hidden), np.float32)
        for a in self._arrays():
            a[slot].copy_to_device(zeros)

    def copy(self, src, dst):
        threads = (min(self.spec.layers, 4), 64)
        blocks = (-(-self.spec.layers // threads[0]), -(-self.spec.hidden // threads[1]))
        for a in self._arrays():
            _copy_slot[blocks, threads](a, src, dst)

    def grow(self, capacity):
        for name in ("h", "c") if self.spec.has_cell_state else ("h",):
            old = getattr(self, name)
            new = np.zeros((capacity,) + old.shape[1:], np.float32)
            new[: old.shape[0]] = old.copy_to_host()
            setattr(self, name, cuda.to_device(new))
        self.seen = np.zeros(capacity, np.uint8)
