"""CPU kernels for big batches: one BLAS sgemm per layer, then the tile path's gate code.

Same arguments and return value as cpu.py's runners. The tile kernels re-read
every weight matrix once per TILE rows; here a chunk of rows' [input | h | 1]
is gathered into one (M, in + H + 1) matrix and every gate pre-activation
comes from one sgemm with [W; R; bias] (np.dot -> SciPy's BLAS, pinned to one
thread, see blas.py; ~85 GFLOP/s on one core here), which reuses each weight
row across the chunk's sessions. Then cpu.py's elementwise gate code runs per
session. Used when blas.gemm_ready() and B >= GEMM_MIN_BATCH (cell.py).
GRU's recurrent weights are split (z, r | candidate: the candidate's recurrent
part is gated by r), so [W; R] is not one matrix there: a GRU layer takes
three sgemms (x W, h R_zr, h R_n or (r*h) R_n) and adds the biases per row.

Numerics on purpose: sgemm sums the products (the bias included, as one more
product) in its own blocked order, while the tile path starts from the bias
and adds the products in order. So a session's numbers here can differ from
the same session on the tile path in the last bits (tests bound it at 1e-5,
and check 1e-4 parity with ONNX Runtime). A row's numbers can also depend a
little on where it sits in its chunk: OpenBLAS handles a chunk's last rows
with other micro-kernels. Measured on the bench model over 30 steps: the same
bits at row 37 of 50, row 3 of 49 and row 0 of 64; h differed by 2.2e-8 at
row 299 of 300 and 3.7e-8 at row 256 of 257.

Threshold measured on the bench model (LSTM 2x128, median us per call, tile vs
GEMM): B=32 283 vs 295, B=48 421 vs 390, B=64 565 vs 487, B=1024 9000 vs 6480;
GRU 2x128: B=32 223 vs 259, B=48 334 vs 325, B=64 454 vs 406, B=256 1862 vs
1362, B=1024 7204 vs 5382 (the same crossover).
Rows go in chunks of at most GEMM_ROWS so a chunk's gates stay in L2 (256 was
~5% faster than 128 or the whole batch at B=1024, about the noise).
"""
from __future__ import annotations

import os

import numpy as np
from numba import float32, njit

from numba_cells.cpu import (_jit, check_batch, gather_state, gru_candidate, gru_update,
                             head_finish, load_input, lstm_update, rnn_update)
from numba_cells.packing import (L_B, L_R, L_RBH, L_RH, L_W, M_HEAD_B, M_HEAD_W, M_HIDDEN, M_IN,
                                 M_LAYER0, M_LAYERS, M_LBR, M_OUT, PER_LAYER)

GEMM_MIN_BATCH = int(os.environ.get("SEQSERVE_CELL_GEMM_MIN_BATCH", "48"))
GEMM_ROWS = int(os.environ.get("SEQSERVE_CELL_GEMM_ROWS", "256"))


@njit(**_jit)
def chunk_rows(B):
    """Rows per sgemm: at most GEMM_ROWS, chunks of equal size (257 rows go as 129 + 128,
    not 256 + 1: a 1-row sgemm is slow and takes another BLAS code path)."""
    n = (B + GEMM_ROWS - 1) // GEMM_ROWS
    return (B + n - 1) // n


@njit(**_jit)
def gather_xh(B, slots, h, l, inp, width, xh):
    """xh (B, width + H + 1) = [inp (B, width) | h[slots, l] (B, H) | 1], the sgemm's left operand.

    The column of ones multiplies the bias row, so sgemm adds the bias too and no
    separate pass over the gates is needed (~0.07 ms per layer at batch 1024 by
    component timing; within the noise end to end)."""
    H = h.shape[2]
    for r in range(B):
        xh[r, :width] = inp[r * width: (r + 1) * width]
        xh[r, width: width + H] = h[slots[r], l]
        xh[r, width + H] = float32(1.0)


@njit(**_jit)
def gemm_gates(B, slots, h, l, inp, width, G, params, meta, xbuf, gates):
    """gates (B, G) = [inp | h_l | 1] @ [W; R; bias] for layer l (packed back to back)."""
    H = meta[M_HIDDEN]
    lb = M_LAYER0 + PER_LAYER * l
    K = width + H + 1
    xh = xbuf[: B * K].reshape(B, K)
    gather_xh(B, slots, h, l, inp, width, xh)
    ow = meta[lb + L_W]
    np.dot(xh, params[ow: ow + K * G].reshape(K, G), gates)


@njit(**_jit)
def head_gemm(b0, nr, t, y, params, meta, inp, ybuf):
    """head_tile for a chunk with one sgemm: the per-row loop was 0.55 us per row at
    out=1 (a serial multiply-add chain), a quarter of the batch-1024 step's non-sgemm time."""
    H, O = meta[M_HIDDEN], meta[M_OUT]
    ow, ob = meta[M_HEAD_W], meta[M_HEAD_B]
    yb = ybuf[: nr * O].reshape(nr, O)
    np.dot(inp[: nr * H].reshape(nr, H), params[ow: ow + H * O].reshape(H, O), yb)
    bias = params[ob: ob + O]
    for r in range(nr):
        yr = y[b0 + r, t]  # (O,)
        for o in range(O):
            yr[o] = yb[r, o] + bias[o]
        head_finish(yr, params, meta)


@njit(**_jit)
def lstm_gemm(x, tok, slots, h, c, y, params, meta, seen):
    code, row = check_batch(slots, tok, seen, meta)
    if code != 0:
        return code, row
    B, T = y.shape[0], y.shape[1]
    L, H, F = meta[M_LAYERS], meta[M_HIDDEN], meta[M_IN]
    G = 4 * H
    M = chunk_rows(B)
    gates = np.empty((M, G), np.float32)
    inp = np.empty(M * max(F, H), np.float32)  # layer input, (M, width)
    xbuf = np.empty(M * (max(F, H) + H + 1), np.float32)
    ybuf = np.empty(M * meta[M_OUT], np.float32)
    for b0 in range(0, B, M):
        nr = min(M, B - b0)
        g = gates[:nr]
        for t in range(T):  # a chunk runs all its steps: sessions are independent
            load_input(b0, nr, t, x, tok, params, meta, inp)
            width = F
            for l in range(L):
                gemm_gates(nr, slots[b0:], h, l, inp, width, G, params, meta, xbuf, g)
                lstm_update(g.reshape(nr * G), G, nr, b0, slots, h, c, l, params, meta, inp)
                width = H
            head_gemm(b0, nr, t, y, params, meta, inp, ybuf)
    return 0, 0


@njit(**_jit)
def rnn_gemm(x, tok, slots, h, c, y, params, meta, seen):
    code, row = check_batch(slots, tok, seen, meta)
    if code != 0:
        return code, row
    B, T = y.shape[0], y.shape[1]
    L, H, F = meta[M_LAYERS], meta[M_HIDDEN], meta[M_IN]
    M = chunk_rows(B)
    gates = np.empty((M, H), np.float32)
    inp = np.empty(M * max(F, H), np.float32)
    xbuf = np.empty(M * (max(F, H) + H + 1), np.float32)
    ybuf = np.empty(M * meta[M_OUT], np.float32)
    for b0 in range(0, B, M):
        nr = min(M, B - b0)
        g = gates[:nr]
        for t in range(T):
            load_input(b0, nr, t, x, tok, params, meta, inp)
            width = F
            for l in range(L):
                gemm_gates(nr, slots[b0:], h, l, inp, width, H, params, meta, xbuf, g)
                rnn_update(g.reshape(nr * H), nr, b0, slots, h, l, inp, H)
                width = H
            head_gemm(b0, nr, t, y, params, meta, inp, ybuf)
    return 0, 0


@njit(**_jit)
def add_rows(acc, nr, ncols, params, off):
    """acc (nr, ncols) += params[off: off + ncols] on every row."""
    b = params[off: off + ncols]
    for r in range(nr):
        acc[r] += b


@njit(**_jit)
def gru_gemm(x, tok, slots, h, c, y, params, meta, seen):
    code, row = check_batch(slots, tok, seen, meta)
    if code != 0:
        return code, row
    B, T = y.shape[0], y.shape[1]
    L, H, F = meta[M_LAYERS], meta[M_HIDDEN], meta[M_IN]
    G = 3 * H
    lbr = meta[M_LBR]
    M = chunk_rows(B)
    gates = np.empty((M, G), np.float32)
    zr = np.empty((M, 2 * H), np.float32)
    cand = np.empty((M, H), np.float32)
    hv = np.empty(M * H, np.float32)  # h_prev rows (M, H)
    rh = np.empty(M * H, np.float32)  # r * h_prev rows, for linear_before_reset=0
    inp = np.empty(M * max(F, H), np.float32)
    ybuf = np.empty(M * meta[M_OUT], np.float32)
    for b0 in range(0, B, M):
        nr = min(M, B - b0)
        g, z, cd = gates[:nr], zr[:nr], cand[:nr]
        for t in range(T):
            load_input(b0, nr, t, x, tok, params, meta, inp)
            width = F
            for l in range(L):
                lb = M_LAYER0 + PER_LAYER * l
                gather_state(b0, nr, slots, h, l, hv, H)
                hm = hv[: nr * H].reshape(nr, H)
                ow, orr, orh = meta[lb + L_W], meta[lb + L_R], meta[lb + L_RH]
                np.dot(inp[: nr * width].reshape(nr, width), params[ow: ow + width * G].reshape(width, G), g)
                add_rows(g, nr, G, params, meta[lb + L_B])
                np.dot(hm, params[orr: orr + H * 2 * H].reshape(H, 2 * H), z)
                g[:, : 2 * H] += z
                flat = g.reshape(nr * G)
                if lbr:  # n = tanh(Wn x + Wbn + r * (Rn h + Rbn))
                    np.dot(hm, params[orh: orh + H * H].reshape(H, H), cd)
                    add_rows(cd, nr, H, params, meta[lb + L_RBH])
                    gru_candidate(flat, G, nr, cd.reshape(nr * H), hv, rh, lbr, 0)
                else:  # n = tanh(Wn x + Wbn + Rn (r * h) + Rbn)
                    gru_candidate(flat, G, nr, cd.reshape(nr * H), hv, rh, lbr, 1)
                    np.dot(rh[: nr * H].reshape(nr, H), params[orh: orh + H * H].reshape(H, H), cd)
                    add_rows(cd, nr, H, params, meta[lb + L_RBH])
                    gru_candidate(flat, G, nr, cd.reshape(nr * H), hv, rh, lbr, 2)
                gru_update(flat, G, nr, b0, slots, h, l, hv, inp)
                width = H
            head_gemm(b0, nr, t, y, params, meta, inp, ybuf)
    return 0, 0


RUNNERS = {"lstm": lstm_gemm, "rnn": rnn_gemm, "gru": gru_gemm}


def layout_ok(meta, G: int, cell: str = "lstm") -> bool:
    """True when every layer's W (in, G), R (H, G) and bias (G,) lie back to back in params,
    so [W; R; bias] is one (in + H + 1, G) matrix (packing.py's order). The GRU runner
    addresses each matrix on its own and needs no particular layout."""
    if cell == "gru":
        return True
    width = meta[M_IN]
    for l in range(meta[M_LAYERS]):
        lb = M_LAYER0 + PER_LAYER * l
        if (meta[lb + L_R] != meta[lb + L_W] + width * G
                or meta[lb + L_B] != meta[lb + L_R] + meta[M_HIDDEN] * G):
            return False
        width = meta[M_HIDDEN]
    return True
