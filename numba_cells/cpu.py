"""CPU kernels: advance a batch of slots by T steps, every layer, in place.

Arguments (all caller-supplied, nothing allocated per row):
  x      float32 (B, T, F)  step inputs (a (1, 1, 1) dummy for token models)
  tok    int64   (B, T)     token ids  (a (1, 1) dummy for float models)
  slots  int64   (B,)       the slot of each row, distinct
  h, c   float32 (capacity, layers, hidden)   state, updated in place (c: dummy unless LSTM)
  y      float32 (B, T, out)                  written
  params float32 flat, meta int64 offsets     see packing.py
  seen   uint8   (capacity,)                  all zeros between calls (duplicate check)
Returns (code, row): code 0 ok, else ERR_* for the offending row, and then no
state has changed (checks run before any arithmetic).

Numerics on purpose:
- Every matrix-vector product is written as a sum of scaled weight rows
  (axpy over contiguous output columns) instead of per-output dot products.
  The vector lanes are independent outputs, so LLVM vectorises it under strict
  IEEE semantics: no `reassoc` is needed, results do not depend on how many
  rows share a call, and a session's numbers are the same alone or in a batch.
  FACTS.md's 4x strict-vs-fastmath gap is the dot-product reduction, which
  this layout does not have.
- `contract` (fused multiply-add) is the only fastmath flag: one rounding per
  multiply-add instead of two (slightly more accurate); measured in bench.py.
- Rows go in tiles of TILE: each weight row is loaded once per tile and used
  for every row in it, which is what makes big batches fast.
"""
from __future__ import annotations

import numpy as np
from numba import float32, njit, prange

from numba_cells.packing import (L_B, L_P, L_R, L_RBH, L_RH, L_W, M_ACT, M_EMB, M_HEAD_B,
                                 M_HEAD_W, M_HIDDEN, M_IN, M_IN_SCALE, M_IN_SHIFT, M_LAYER0,
                                 M_LAYERS, M_LBR, M_OUT, M_OUT_SCALE, M_OUT_SHIFT, M_TOKENS,
                                 M_VOCAB, PER_LAYER)
from numba_cells.scalar import ACT_LOGSOFTMAX, ACT_SOFTMAX, activate, gru_unit, lstm_unit, sigmoid, tanh

FASTMATH = {"contract"}
TILE = 8
ERR_SLOT_RANGE, ERR_SLOT_DUP, ERR_TOKEN = 1, 2, 3
# batches at least this big use the prange kernels (threads cost a few us to wake)
PARALLEL_MIN_BATCH = 64

_jit = dict(cache=True, fastmath=FASTMATH, nogil=True)


@njit(**_jit)
def check_batch(slots, tok, seen, meta):
    """(code, row) of the first bad row; leaves `seen` all zeros again."""
    cap = seen.shape[0]
    B = slots.shape[0]
    code, row = 0, 0
    n = 0
    for b in range(B):
        s = slots[b]
        if s < 0 or s >= cap:
            code, row = ERR_SLOT_RANGE, b
            break
        if seen[s]:
            code, row = ERR_SLOT_DUP, b
            break
        seen[s] = 1
        n += 1
    for b in range(n):
        seen[slots[b]] = 0
    if code == 0 and meta[M_TOKENS]:
        V = meta[M_VOCAB]
        for b in range(B):
            for t in range(tok.shape[1]):
                if tok[b, t] < 0 or tok[b, t] >= V:
                    return ERR_TOKEN, b
    return code, row


@njit(**_jit)
def gemv_tile(acc, stride, col0, ncols, nr, params, off, vec, width):
    """acc[r, col0:col0+ncols] += vec[r, :width] @ W, W = params[off:] as (width, ncols)."""
    for k in range(width):
        base = off + k * ncols
        for r in range(nr):
            v = vec[r * width + k]
            a0 = r * stride + col0
            for j in range(ncols):
                acc[a0 + j] += params[base + j] * v


@njit(**_jit)
def load_input(b0, nr, t, x, tok, params, meta, inp):
    """Layer 0's input rows -> inp (nr, F): embedding rows or normalised features."""
    F = meta[M_IN]
    if meta[M_TOKENS]:
        oe = meta[M_EMB]
        for r in range(nr):
            base = oe + tok[b0 + r, t] * F
            for k in range(F):
                inp[r * F + k] = params[base + k]
    elif meta[M_IN_SCALE] >= 0:
        osc, osh = meta[M_IN_SCALE], meta[M_IN_SHIFT]
        for r in range(nr):
            for k in range(F):
                inp[r * F + k] = x[b0 + r, t, k] * params[osc + k] + params[osh + k]
    else:
        for r in range(nr):
            for k in range(F):
                inp[r * F + k] = x[b0 + r, t, k]


@njit(**_jit)
def gather_state(b0, nr, slots, h, l, hv, H):
    for r in range(nr):
        s = slots[b0 + r]
        for k in range(H):
            hv[r * H + k] = h[s, l, k]


@njit(**_jit)
def fill_bias(acc, nr, ncols, params, off):
    for r in range(nr):
        for j in range(ncols):
            acc[r * ncols + j] = params[off + j]


@njit(**_jit)
def head_tile(b0, nr, t, y, params, meta, inp):
    """y[b0:b0+nr, t] = activation(inp @ Wh + bh) * out_scale + out_shift."""
    H, O = meta[M_HIDDEN], meta[M_OUT]
    ow, ob = meta[M_HEAD_W], meta[M_HEAD_B]
    act = meta[M_ACT]
    for r in range(nr):
        for o in range(O):
            y[b0 + r, t, o] = params[ob + o]
    for k in range(H):
        base = ow + k * O
        for r in range(nr):
            v = inp[r * H + k]
            for o in range(O):
                y[b0 + r, t, o] += params[base + o] * v
    for r in range(nr):
        if act == ACT_SOFTMAX or act == ACT_LOGSOFTMAX:
            m = y[b0 + r, t, 0]
            for o in range(1, O):
                m = max(m, y[b0 + r, t, o])
            total = float32(0.0)
            for o in range(O):
                total += np.exp(y[b0 + r, t, o] - m)
            if act == ACT_SOFTMAX:
                for o in range(O):
                    y[b0 + r, t, o] = np.exp(y[b0 + r, t, o] - m) / total
            else:
                lse = m + np.log(total)
                for o in range(O):
                    y[b0 + r, t, o] = y[b0 + r, t, o] - lse
        elif act != 0:
            for o in range(O):
                y[b0 + r, t, o] = activate(y[b0 + r, t, o], act)
        if meta[M_OUT_SCALE] >= 0:
            osc, osh = meta[M_OUT_SCALE], meta[M_OUT_SHIFT]
            for o in range(O):
                y[b0 + r, t, o] = y[b0 + r, t, o] * params[osc + o] + params[osh + o]


@njit(**_jit)
def lstm_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv):
    L, H = meta[M_LAYERS], meta[M_HIDDEN]
    G = 4 * H
    width = meta[M_IN]
    load_input(b0, nr, t, x, tok, params, meta, inp)
    for l in range(L):
        lb = M_LAYER0 + PER_LAYER * l
        fill_bias(gates, nr, G, params, meta[lb + L_B])
        gather_state(b0, nr, slots, h, l, hv, H)
        gemv_tile(gates, G, 0, G, nr, params, meta[lb + L_W], inp, width)  # (nr, 4H)
        gemv_tile(gates, G, 0, G, nr, params, meta[lb + L_R], hv, H)
        op = meta[lb + L_P]
        for r in range(nr):
            s = slots[b0 + r]
            g = r * G
            for j in range(H):
                hn, cn = lstm_unit(gates[g + j], gates[g + H + j], gates[g + 2 * H + j],
                                   gates[g + 3 * H + j], c[s, l, j],
                                   params[op + j], params[op + H + j], params[op + 2 * H + j])
                h[s, l, j] = hn
                c[s, l, j] = cn
                inp[r * H + j] = hn  # next layer's input
        width = H
    head_tile(b0, nr, t, y, params, meta, inp)


@njit(**_jit)
def gru_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv):
    L, H = meta[M_LAYERS], meta[M_HIDDEN]
    G = 3 * H
    width = meta[M_IN]
    lbr = meta[M_LBR]
    load_input(b0, nr, t, x, tok, params, meta, inp)
    cand = np.empty(nr * H, np.float32)  # recurrent part of the candidate, (nr, H)
    rh = np.empty(nr * H, np.float32)  # r * h_prev for linear_before_reset=0
    for l in range(L):
        lb = M_LAYER0 + PER_LAYER * l
        fill_bias(gates, nr, G, params, meta[lb + L_B])
        fill_bias(cand, nr, H, params, meta[lb + L_RBH])
        gather_state(b0, nr, slots, h, l, hv, H)
        gemv_tile(gates, G, 0, G, nr, params, meta[lb + L_W], inp, width)  # (nr, 3H)
        gemv_tile(gates, G, 0, 2 * H, nr, params, meta[lb + L_R], hv, H)  # z, r
        if lbr:
            # n = tanh(Wn x + Wbn + r * (Rn h + Rbn))
            gemv_tile(cand, H, 0, H, nr, params, meta[lb + L_RH], hv, H)
            for r in range(nr):
                s = slots[b0 + r]
                g = r * G
                for j in range(H):
                    z = sigmoid(gates[g + j])
                    rr = sigmoid(gates[g + H + j])
                    n = tanh(gates[g + 2 * H + j] + rr * cand[r * H + j])
                    hn = gru_unit(z, n, hv[r * H + j])
                    h[s, l, j] = hn
                    inp[r * H + j] = hn
        else:
            # n = tanh(Wn x + Wbn + Rn (r * h) + Rbn): r is needed for all units first
            for r in range(nr):
                for j in range(H):
                    rh[r * H + j] = sigmoid(gates[r * G + H + j]) * hv[r * H + j]
            gemv_tile(cand, H, 0, H, nr, params, meta[lb + L_RH], rh, H)
            for r in range(nr):
                s = slots[b0 + r]
                g = r * G
                for j in range(H):
                    z = sigmoid(gates[g + j])
                    n = tanh(gates[g + 2 * H + j] + cand[r * H + j])
                    hn = gru_unit(z, n, hv[r * H + j])
                    h[s, l, j] = hn
                    inp[r * H + j] = hn
        width = H
    head_tile(b0, nr, t, y, params, meta, inp)


@njit(**_jit)
def rnn_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv):
    L, H = meta[M_LAYERS], meta[M_HIDDEN]
    width = meta[M_IN]
    load_input(b0, nr, t, x, tok, params, meta, inp)
    for l in range(L):
        lb = M_LAYER0 + PER_LAYER * l
        fill_bias(gates, nr, H, params, meta[lb + L_B])
        gather_state(b0, nr, slots, h, l, hv, H)
        gemv_tile(gates, H, 0, H, nr, params, meta[lb + L_W], inp, width)
        gemv_tile(gates, H, 0, H, nr, params, meta[lb + L_R], hv, H)
        for r in range(nr):
            s = slots[b0 + r]
            for j in range(H):
                hn = tanh(gates[r * H + j])
                h[s, l, j] = hn
                inp[r * H + j] = hn
        width = H
    head_tile(b0, nr, t, y, params, meta, inp)


# The drivers are spelled out per cell rather than made by a closure factory:
# Numba's on-disk cache cannot reuse a closure over a dispatcher (its key pickles
# the closure, which differs per process), so a factory would recompile every load.

@njit(**_jit)
def scratch(meta):
    """Per-tile work buffers: gates (TILE, 4H), layer input (TILE, max(F, H)), state (TILE, H)."""
    H = meta[M_HIDDEN]
    return (np.empty(TILE * 4 * H, np.float32), np.empty(TILE * max(meta[M_IN], H), np.float32),
            np.empty(TILE * H, np.float32))


@njit(**_jit)
def lstm_serial(x, tok, slots, h, c, y, params, meta, seen):
    code, row = check_batch(slots, tok, seen, meta)
    if code != 0:
        return code, row
    B, T = y.shape[0], y.shape[1]
    gates, inp, hv = scratch(meta)
    for b0 in range(0, B, TILE):
        nr = min(TILE, B - b0)
        for t in range(T):  # a tile runs all its steps: sessions are independent
            lstm_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv)
    return 0, 0


@njit(parallel=True, **_jit)
def lstm_parallel(x, tok, slots, h, c, y, params, meta, seen):
    code, row = check_batch(slots, tok, seen, meta)
    if code != 0:
        return code, row
    B, T = y.shape[0], y.shape[1]
    for ti in prange((B + TILE - 1) // TILE):
        gates, inp, hv = scratch(meta)
        b0 = ti * TILE
        nr = min(TILE, B - b0)
        for t in range(T):
            lstm_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv)
    return 0, 0

@njit(**_jit)
def gru_serial(x, tok, slots, h, c, y, params, meta, seen):
    code, row = check_batch(slots, tok, seen, meta)
    if code != 0:
        return code, row
    B, T = y.shape[0], y.shape[1]
    gates, inp, hv = scratch(meta)
    for b0 in range(0, B, TILE):
        nr = min(TILE, B - b0)
        for t in range(T):  # a tile runs all its steps: sessions are independent
            gru_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv)
    return 0, 0


@njit(parallel=True, **_jit)
def gru_parallel(x, tok, slots, h, c, y, params, meta, seen):
    code, row = check_batch(slots, tok, seen, meta)
    if code != 0:
        return code, row
    B, T = y.shape[0], y.shape[1]
    for ti in prange((B + TILE - 1) // TILE):
        gates, inp, hv = scratch(meta)
        b0 = ti * TILE
        nr = min(TILE, B - b0)
        for t in range(T):
            gru_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv)
    return 0, 0

@njit(**_jit)
def rnn_serial(x, tok, slots, h, c, y, params, meta, seen):
    code, row = check_batch(slots, tok, seen, meta)
    if code != 0:
        return code, row
    B, T = y.shape[0], y.shape[1]
    gates, inp, hv = scratch(meta)
    for b0 in range(0, B, TILE):
        nr = min(TILE, B - b0)
        for t in range(T):  # a tile runs all its steps: sessions are independent
            rnn_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv)
    return 0, 0


@njit(parallel=True, **_jit)
def rnn_parallel(x, tok, slots, h, c, y, params, meta, seen):
    code, row = check_batch(slots, tok, seen, meta)
    if code != 0:
        return code, row
    B, T = y.shape[0], y.shape[1]
    for ti in prange((B + TILE - 1) // TILE):
        gates, inp, hv = scratch(meta)
        b0 = ti * TILE
        nr = min(TILE, B - b0)
        for t in range(T):
            rnn_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv)
    return 0, 0


RUNNERS = {"lstm": (lstm_serial, lstm_parallel), "gru": (gru_serial, gru_parallel),
           "rnn": (rnn_serial, rnn_parallel)}
