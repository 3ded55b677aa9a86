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
- The one fastmath flag is `contract` (fused multiply-add: one rounding per
  multiply-add instead of two, so if anything more accurate). Measured on the
  bench model (LSTM 2x128, CPU time per call, two alternating runs each):
  strict 23.6 / 26.1 us at batch 1 and 878 / 897 us at batch 64; with
  `contract` 22.5 / 23.9 us and 747 / 750 us.
- Rows go in tiles of TILE: each weight row is loaded once per tile and used
  for every row in it (batch 64 costs ~12 us of CPU per row, batch 1 ~23 us).
  The tile loops are not register-blocked, so for big batches the LSTM and RNN
  cells use one BLAS sgemm per layer instead (cpu_gemm.py, which says how that
  changes the summation order).
"""
from __future__ import annotations

import os

import numpy as np
from numba import carray, float32, njit, prange

from numba_cells.packing import (L_B, L_P, L_R, L_RBH, L_RH, L_W, M_ACT, M_EMB, M_HEAD_B,
                                 M_HEAD_W, M_HIDDEN, M_IN, M_IN_SCALE, M_IN_SHIFT, M_LAYER0,
                                 M_LAYERS, M_LBR, M_OUT, M_OUT_SCALE, M_OUT_SHIFT, M_PEEP, M_TOKENS,
                                 M_VOCAB, PER_LAYER)
from numba_cells.scalar import (ACT_LOGSOFTMAX, ACT_SOFTMAX, activate, exp32, gru_unit,
                                lstm_cell_state, lstm_hidden_gated, sigmoid, tanh)

FASTMATH = {"contract"}  # see the module docstring for the measurement
TILE = 8
ERR_SLOT_RANGE, ERR_SLOT_DUP, ERR_TOKEN = 1, 2, 3
# Batches at least this big use the prange kernels; 0 turns them off (the default).
# On this project's shared 2-core machine (load ~10) the threads straggled:
# batch 64 took 8.7 ms with prange vs ~1.1 ms serial, so they are opt-in.
PARALLEL_MIN_BATCH = int(os.environ.get("SEQSERVE_CELL_PARALLEL_MIN_BATCH", "0"))

# error_model="numpy": no ZeroDivisionError branch per division, which would
# block vectorisation of the gate loops (a division by zero cannot happen there)
_jit = dict(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")


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
    """acc[r, col0:col0+ncols] += vec[r, :width] @ W, W = params[off:] as (width, ncols).

    Slices rather than `acc[a0 + j]`: a computed signed index makes Numba emit a
    negative-index wraparound per element, which blocks vectorisation (10x slower).
    Four weight rows per pass, applied to two batch rows at a time, cut the
    loads and stores per multiply-add (22.8 -> 16.5 us for a 128x512 block of
    8 rows). Every output still sums k in the same order, so the numbers do not
    depend on how rows pair up.
    """
    k4 = width - width % 4
    r2 = nr - nr % 2
    for k in range(0, k4, 4):
        b = off + k * ncols
        w0 = params[b: b + ncols]
        w1 = params[b + ncols: b + 2 * ncols]
        w2 = params[b + 2 * ncols: b + 3 * ncols]
        w3 = params[b + 3 * ncols: b + 4 * ncols]
        for r in range(0, r2, 2):
            xa = vec[r * width + k: r * width + k + 4]
            xb = vec[(r + 1) * width + k: (r + 1) * width + k + 4]
            a0, a1, a2, a3 = xa[0], xa[1], xa[2], xa[3]
            b0, b1, b2, b3 = xb[0], xb[1], xb[2], xb[3]
            aa = acc[r * stride + col0: r * stride + col0 + ncols]
            ab = acc[(r + 1) * stride + col0: (r + 1) * stride + col0 + ncols]
            for j in range(ncols):
                u0, u1, u2, u3 = w0[j], w1[j], w2[j], w3[j]
                aa[j] = aa[j] + u0 * a0 + u1 * a1 + u2 * a2 + u3 * a3
                ab[j] = ab[j] + u0 * b0 + u1 * b1 + u2 * b2 + u3 * b3
        for r in range(r2, nr):
            xr = vec[r * width + k: r * width + k + 4]
            v0, v1, v2, v3 = xr[0], xr[1], xr[2], xr[3]
            a = acc[r * stride + col0: r * stride + col0 + ncols]
            for j in range(ncols):
                a[j] = a[j] + w0[j] * v0 + w1[j] * v1 + w2[j] * v2 + w3[j] * v3
    for k in range(k4, width):
        w = params[off + k * ncols: off + (k + 1) * ncols]
        for r in range(nr):
            v = vec[r * width + k]
            a = acc[r * stride + col0: r * stride + col0 + ncols]
            for j in range(ncols):
                a[j] += w[j] * v


@njit(**_jit)
def copy_into(dst, src):
    """dst[:n] = src (n = len(src)) as a loop: a slice assignment costs Numba's
    generic broadcast checks, ~100-200 ns per call; this is a few ns per row."""
    for j in range(src.shape[0]):
        dst[j] = src[j]


@njit(**_jit)
def load_input(b0, nr, t, x, tok, params, meta, inp):
    """Layer 0's input rows -> inp (nr, F): embedding rows or normalised features."""
    F = meta[M_IN]
    if meta[M_TOKENS]:
        oe = meta[M_EMB]
        for r in range(nr):
            base = oe + tok[b0 + r, t] * F
            copy_into(inp[r * F: (r + 1) * F], params[base: base + F])
    elif meta[M_IN_SCALE] >= 0:
        osc, osh = meta[M_IN_SCALE], meta[M_IN_SHIFT]
        sc, sh = params[osc: osc + F], params[osh: osh + F]
        for r in range(nr):
            xr, dst = x[b0 + r, t], inp[r * F: (r + 1) * F]
            for k in range(F):
                dst[k] = xr[k] * sc[k] + sh[k]
    else:
        for r in range(nr):
            copy_into(inp[r * F: (r + 1) * F], x[b0 + r, t])


@njit(**_jit)
def gather_state(b0, nr, slots, h, l, hv, H):
    for r in range(nr):
        copy_into(hv[r * H: (r + 1) * H], h[slots[b0 + r], l])


@njit(**_jit)
def fill_bias(acc, nr, ncols, params, off):
    for r in range(nr):
        copy_into(acc[r * ncols: (r + 1) * ncols], params[off: off + ncols])


@njit(**_jit)
def head_finish(yr, params, meta):
    """One output row (O,) after the head's affine map: activation, then out scale/shift."""
    O, act = meta[M_OUT], meta[M_ACT]
    if act == ACT_SOFTMAX or act == ACT_LOGSOFTMAX:
        m = yr[0]
        for o in range(1, O):
            m = max(m, yr[o])
        total = float32(0.0)
        for o in range(O):
            total += exp32(yr[o] - m)
        if act == ACT_SOFTMAX:
            for o in range(O):
                yr[o] = exp32(yr[o] - m) / total
        else:
            lse = m + np.log(total)
            for o in range(O):
                yr[o] = yr[o] - lse
    elif act != 0:
        for o in range(O):
            yr[o] = activate(yr[o], act)
    if meta[M_OUT_SCALE] >= 0:
        sc = params[meta[M_OUT_SCALE]: meta[M_OUT_SCALE] + O]
        sh = params[meta[M_OUT_SHIFT]: meta[M_OUT_SHIFT] + O]
        for o in range(O):
            yr[o] = yr[o] * sc[o] + sh[o]


@njit(**_jit)
def head_row(yr, hr, params, meta):
    """yr (O,) = activation(hr @ Wh + bh) * out_scale + out_shift, hr: the last layer's h (H,).

    Every output sums k in order, in both branches (so the same numbers). Few
    outputs (a forecaster's 1): one running sum per output, indexed directly;
    a weight-row slice per k cost ~8 ns each, ~0.5 us of a 64-unit step. Many
    outputs (a vocabulary): weight rows, vectorised over the outputs.
    """
    H, O = meta[M_HIDDEN], meta[M_OUT]
    ow, ob = meta[M_HEAD_W], meta[M_HEAD_B]
    if O < 8:
        for o in range(O):
            acc = params[ob + o]
            for k in range(H):
                acc += params[ow + k * O + o] * hr[k]
            yr[o] = acc
    else:
        copy_into(yr, params[ob: ob + O])
        for k in range(H):
            w = params[ow + k * O: ow + (k + 1) * O]
            v = hr[k]
            for o in range(O):
                yr[o] += w[o] * v
    head_finish(yr, params, meta)


@njit(**_jit)
def head_tile(b0, nr, t, y, params, meta, inp):
    """y[b0:b0+nr, t] = activation(inp @ Wh + bh) * out_scale + out_shift."""
    H = meta[M_HIDDEN]
    for r in range(nr):
        head_row(y[b0 + r, t], inp[r * H: (r + 1) * H], params, meta)


@njit(**_jit)
def head_rows(y2, t, params, meta):
    """head_finish over every row of y2[:, t] (the batched path computed the affine part)."""
    if meta[M_ACT] != 0 or meta[M_OUT_SCALE] >= 0:
        for r in range(y2.shape[0]):
            head_finish(y2[r, t], params, meta)


@njit(**_jit)
def lstm_update(gates, G, nr, b0, slots, h, c, l, params, meta, inp):
    """Gate pre-activations (nr rows of stride G, order i, o, f, c) -> h, c of layer l, in place;
    the new h also goes to inp (nr, H), the next layer's input."""
    H = meta[M_HIDDEN]
    lb = M_LAYER0 + PER_LAYER * l
    peep = meta[M_PEEP]
    op = meta[lb + L_P]
    pi, po, pf = params[op: op + H], params[op + H: op + 2 * H], params[op + 2 * H: op + 3 * H]
    for r in range(nr):
        g = r * G
        # Slices, and one phase per loop: a loop that reads and writes many
        # arrays needs more runtime alias checks than LLVM will emit, and then
        # it stays scalar (measured: 27 ns per unit fused, 5 ns split).
        gi, go = gates[g: g + H], gates[g + H: g + 2 * H]
        gf, gc = gates[g + 2 * H: g + 3 * H], gates[g + 3 * H: g + 4 * H]
        hs, cs = h[slots[b0 + r], l], c[slots[b0 + r], l]
        if peep:
            for j in range(H):
                gi[j] += pi[j] * cs[j]
            for j in range(H):
                gf[j] += pf[j] * cs[j]
        for j in range(H):
            gi[j] = sigmoid(gi[j])
        for j in range(H):
            gf[j] = sigmoid(gf[j])
        for j in range(H):
            gc[j] = tanh(gc[j])
        for j in range(H):
            cs[j] = lstm_cell_state(gi[j], gf[j], gc[j], cs[j])
        if peep:
            for j in range(H):
                go[j] += po[j] * cs[j]
        # sigmoid and tanh in one loop stayed scalar (11.5 ns per unit, measured
        # at batch 1024); split in two loops they vectorise (1.0 + 1.2 ns).
        # Same operations in the same order, so the same numbers.
        for j in range(H):
            go[j] = sigmoid(go[j])
        for j in range(H):
            hs[j] = lstm_hidden_gated(go[j], cs[j])
        copy_into(inp[r * H: (r + 1) * H], hs)  # next layer's input


@njit(**_jit)
def lstm_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv):
    lstm_layers(b0, nr, t, x, tok, slots, h, c, params, meta, gates, inp, hv)
    head_tile(b0, nr, t, y, params, meta, inp)


@njit(**_jit)
def lstm_layers(b0, nr, t, x, tok, slots, h, c, params, meta, gates, inp, hv):
    """Every layer of one step for rows b0..b0+nr: state updated, the last h in inp (nr, H)."""
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
        lstm_update(gates, G, nr, b0, slots, h, c, l, params, meta, inp)
        width = H


@njit(**_jit)
def gru_candidate(gates, G, nr, cand, hv, rh, lbr, phase):
    """GRU candidate in place in gates[:, 2H:3H] (rows of stride G, order z, r, h).

    cand (nr, H) holds the recurrent part: Rh h + Rbh (lbr=1), or Rh (r*h) + Rbh (lbr=0),
    for which phase 1 first writes r*h into rh and phase 2 finishes. One phase per loop.
    """
    H = G // 3
    for r in range(nr):
        g = r * G
        gr, gn = gates[g + H: g + 2 * H], gates[g + 2 * H: g + G]
        cr = cand[r * H: (r + 1) * H]
        if lbr:
            for j in range(H):
                gr[j] = sigmoid(gr[j])
            for j in range(H):
                gn[j] = tanh(gn[j] + gr[j] * cr[j])
        elif phase == 1:
            hp, dst = hv[r * H: (r + 1) * H], rh[r * H: (r + 1) * H]
            for j in range(H):
                dst[j] = sigmoid(gr[j]) * hp[j]
        else:
            for j in range(H):
                gn[j] = tanh(gn[j] + cr[j])


@njit(**_jit)
def gru_update(gates, G, nr, b0, slots, h, l, hv, inp):
    """h = (1 - z) n + z h_prev for layer l, in place; the new h also goes to inp."""
    H = G // 3
    for r in range(nr):
        gz, gn = gates[r * G: r * G + H], gates[r * G + 2 * H: (r + 1) * G]
        hp, hs = hv[r * H: (r + 1) * H], h[slots[b0 + r], l]
        for j in range(H):
            gz[j] = sigmoid(gz[j])
        for j in range(H):
            hs[j] = gru_unit(gz[j], gn[j], hp[j])
        copy_into(inp[r * H: (r + 1) * H], hs)


@njit(**_jit)
def rnn_update(gates, nr, b0, slots, h, l, inp, H):
    for r in range(nr):
        g, hs = gates[r * H: (r + 1) * H], h[slots[b0 + r], l]
        for j in range(H):
            hs[j] = tanh(g[j])
        copy_into(inp[r * H: (r + 1) * H], hs)


@njit(**_jit)
def gru_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv):
    H = meta[M_HIDDEN]
    cand = np.empty(nr * H, np.float32)  # recurrent part of the candidate, (nr, H)
    rh = np.empty(nr * H, np.float32)  # r * h_prev for linear_before_reset=0
    gru_layers(b0, nr, t, x, tok, slots, h, params, meta, gates, inp, hv, cand, rh)
    head_tile(b0, nr, t, y, params, meta, inp)


@njit(**_jit)
def gru_layers(b0, nr, t, x, tok, slots, h, params, meta, gates, inp, hv, cand, rh):
    """As lstm_layers; cand and rh: (nr, H) work rows."""
    L, H = meta[M_LAYERS], meta[M_HIDDEN]
    G = 3 * H
    width = meta[M_IN]
    lbr = meta[M_LBR]
    load_input(b0, nr, t, x, tok, params, meta, inp)
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
            gru_candidate(gates, G, nr, cand, hv, rh, lbr, 0)
        else:
            # n = tanh(Wn x + Wbn + Rn (r * h) + Rbn): r is needed for all units first
            gru_candidate(gates, G, nr, cand, hv, rh, lbr, 1)
            gemv_tile(cand, H, 0, H, nr, params, meta[lb + L_RH], rh, H)
            gru_candidate(gates, G, nr, cand, hv, rh, lbr, 2)
        gru_update(gates, G, nr, b0, slots, h, l, hv, inp)
        width = H


@njit(**_jit)
def rnn_tile(b0, nr, t, x, tok, slots, h, c, y, params, meta, gates, inp, hv):
    rnn_layers(b0, nr, t, x, tok, slots, h, params, meta, gates, inp, hv)
    head_tile(b0, nr, t, y, params, meta, inp)


@njit(**_jit)
def rnn_layers(b0, nr, t, x, tok, slots, h, params, meta, gates, inp, hv):
    """As lstm_layers."""
    L, H = meta[M_LAYERS], meta[M_HIDDEN]
    width = meta[M_IN]
    load_input(b0, nr, t, x, tok, params, meta, inp)
    for l in range(L):
        lb = M_LAYER0 + PER_LAYER * l
        fill_bias(gates, nr, H, params, meta[lb + L_B])
        gather_state(b0, nr, slots, h, l, hv, H)
        gemv_tile(gates, H, 0, H, nr, params, meta[lb + L_W], inp, width)
        gemv_tile(gates, H, 0, H, nr, params, meta[lb + L_R], hv, H)
        rnn_update(gates, nr, b0, slots, h, l, inp, H)
        width = H


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


# One float-input session's step, the serving layer's hot path (Cell.step_into):
# x (1, 1, F), slot an int, y written straight into rows[slot] (rows: (n, out),
# e.g. the sessions' last-output table). The same layer and head functions as
# the batched drivers, so the same numbers. Nothing is allocated per call
# (allocating cost ~0.5 us of a ~4 us 64-unit step): `work` (one_work_size
# floats) is the caller's reused scratch, and the layer functions see the
# session as row 0 of one-slot views of h and c, through a constant slot
# array. Returns an ERR_* code.

_SLOT0 = np.zeros(1, np.int64)  # a frozen global in the kernels: slots = [0]
_TOK0 = np.zeros((1, 1), np.int64)  # the token dummy of a float model


def one_work_size(meta) -> int:
    """Floats of a *_one kernel's work buffer: gates (4H), input (max(F, H)), h, two GRU rows."""
    H = int(meta[M_HIDDEN])
    return 4 * H + max(int(meta[M_IN]), H) + 3 * H


@njit(**_jit)
def _one_views(slot, h, c, rows, meta, work):
    """(code, h, c of the slot as (1, L, H) views, gates, inp, hv, cand, rh in work)."""
    H = meta[M_HIDDEN]
    code = ERR_SLOT_RANGE if slot < 0 or slot >= h.shape[0] or slot >= rows.shape[0] else 0
    g1 = 4 * H
    i1 = g1 + max(meta[M_IN], H)
    c1 = c[slot: slot + 1] if c.shape[0] > 1 else c  # c: a (1, 1, 1) dummy unless LSTM
    return (code, h[slot: slot + 1], c1, work[:g1], work[g1: i1], work[i1: i1 + H],
            work[i1 + H: i1 + 2 * H], work[i1 + 2 * H: i1 + 3 * H])


@njit(**_jit)
def lstm_one(x, slot, h, c, rows, params, meta, work):
    code, h1, c1, gates, inp, hv, cand, rh = _one_views(slot, h, c, rows, meta, work)
    if code != 0:
        return code
    lstm_layers(0, 1, 0, x, _TOK0, _SLOT0, h1, c1, params, meta, gates, inp, hv)
    head_row(rows[slot], inp, params, meta)
    return 0


@njit(**_jit)
def gru_one(x, slot, h, c, rows, params, meta, work):
    code, h1, c1, gates, inp, hv, cand, rh = _one_views(slot, h, c, rows, meta, work)
    if code != 0:
        return code
    gru_layers(0, 1, 0, x, _TOK0, _SLOT0, h1, params, meta, gates, inp, hv, cand, rh)
    head_row(rows[slot], inp, params, meta)
    return 0


@njit(**_jit)
def rnn_one(x, slot, h, c, rows, params, meta, work):
    code, h1, c1, gates, inp, hv, cand, rh = _one_views(slot, h, c, rows, meta, work)
    if code != 0:
        return code
    rnn_layers(0, 1, 0, x, _TOK0, _SLOT0, h1, params, meta, gates, inp, hv)
    head_row(rows[slot], inp, params, meta)
    return 0


RUNNERS = {"lstm": (lstm_serial, lstm_parallel), "gru": (gru_serial, gru_parallel),
           "rnn": (rnn_serial, rnn_parallel)}
ONE = {"lstm": lstm_one, "gru": gru_one, "rnn": rnn_one}



# The same single-slot step as a C function (numba.cfunc), for a native
# caller (the serving layer's compiled hot path, serving/_hotpath.c) that
# holds raw pointers: no Python objects cross the call, so none are unboxed.
# Arguments: x (F floats), slot, then each array as (pointer, leading size):
# h and c (n, L, H) - c a (1, 1, 1) dummy unless LSTM -, rows (n, out),
# params, meta (int64) and the work buffer (one_work_size floats). The
# numbers are lstm_one's / gru_one's / rnn_one's: it calls them.
def _one_csig():
    from numba import types
    f32p, i64, i64p = types.CPointer(types.float32), types.int64, types.CPointer(types.int64)
    return types.int64(f32p, i64, f32p, i64, f32p, i64, f32p, i64, f32p, i64, i64p, i64, f32p, i64)


def _lstm_one_c(x, slot, h, nh, c, nc, rows, nrows, params, npar, meta, nmeta, work, nwork):
    if nc != nh:  # an LSTM's c is a full (n, L, H) table, like h
        return ERR_SLOT_RANGE
    m, hh, cc, r, p, w, xx = _c_views(x, h, nh, c, nc, True, rows, nrows, params, npar, meta,
                                     nmeta, work, nwork)
    return lstm_one(xx, slot, hh, cc, r, p, m, w)


def _gru_one_c(x, slot, h, nh, c, nc, rows, nrows, params, npar, meta, nmeta, work, nwork):
    m, hh, cc, r, p, w, xx = _c_views(x, h, nh, c, nc, False, rows, nrows, params, npar, meta,
                                     nmeta, work, nwork)
    return gru_one(xx, slot, hh, cc, r, p, m, w)


def _rnn_one_c(x, slot, h, nh, c, nc, rows, nrows, params, npar, meta, nmeta, work, nwork):
    m, hh, cc, r, p, w, xx = _c_views(x, h, nh, c, nc, False, rows, nrows, params, npar, meta,
                                     nmeta, work, nwork)
    return rnn_one(xx, slot, hh, cc, r, p, m, w)


@njit(**_jit)
def _c_views(x, h, nh, c, nc, c_full, rows, nrows, params, npar, meta, nmeta, work, nwork):
    """The pointers as arrays of the shapes the *_one kernels take; c is the
    (nc, L, H) table when c_full (LSTM), else the (1, 1, 1) dummy."""
    m = carray(meta, nmeta)
    L, H = m[M_LAYERS], m[M_HIDDEN]
    cc = carray(c, (nc, L, H)) if c_full else carray(c, (1, 1, 1))
    return (m, carray(h, (nh, L, H)), cc, carray(rows, (nrows, m[M_OUT])), carray(params, npar),
            carray(work, nwork), carray(x, (1, 1, m[M_IN])))


_ONE_C = {"lstm": _lstm_one_c, "gru": _gru_one_c, "rnn": _rnn_one_c}
_one_c_compiled: dict = {}


def one_cfunc(kind: str):
    """The compiled C function of ONE[kind] (see above); its `.address` is what a
    native caller calls. Compiled on first use (or loaded from Numba's cache)."""
    fn = _one_c_compiled.get(kind)
    if fn is None:
        from numba import cfunc
        fn = _one_c_compiled[kind] = cfunc(_one_csig(), **_jit)(_ONE_C[kind])
    return fn
