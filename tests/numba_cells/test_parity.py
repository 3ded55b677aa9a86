"""The cell, stepped one step (or one chunk) at a time with sessions at different
positions sharing batches, against ONNX Runtime running each whole sequence on
the same ONNX file."""
from __future__ import annotations

import numpy as np
import pytest

from numba_cells import cpu_gemm, load_cell

TOL = 1e-4
STEPS = 200


def _inputs(cell, B, T, rng):
    s = cell.spec
    if s.input_kind == "tokens":
        return rng.integers(0, s.input_features, size=(B, T), dtype=np.int64)
    return (1.5 * rng.standard_normal((B, T, s.input_features))).astype(np.float32)


def _initial_state(cell, B, rng):
    s = cell.spec
    h0 = (0.5 * rng.standard_normal((s.layers, B, s.hidden))).astype(np.float32)
    c0 = (0.5 * rng.standard_normal((s.layers, B, s.hidden))).astype(np.float32) if s.has_cell_state else None
    return h0, c0


def stream(cell, xs, slots, rng, chunk_max=1, stagger=3):
    """Advance session b over xs[b] from tick b*stagger on; at each tick a random subset of
    the sessions that have steps left goes in one shuffled batch (chunks of up to
    chunk_max steps, all rows of a batch the same length). -> y (B, T, out)."""
    B, T = xs.shape[:2]
    ys = np.full((B, T, cell.spec.output_size), np.nan, np.float32)
    pos = np.zeros(B, int)
    tick = 0
    while (pos < T).any():
        active = [b for b in range(B) if b * stagger <= tick and pos[b] < T and rng.random() < 0.8]
        rng.shuffle(active)
        if active:
            n = int(min(rng.integers(1, chunk_max + 1), min(T - pos[b] for b in active)))
            batch_slots = slots[active]
            if chunk_max == 1:
                y = cell.step(np.stack([xs[b, pos[b]] for b in active]), batch_slots)[:, None]
            else:
                y = cell.step_chunk(np.stack([xs[b, pos[b]:pos[b] + n] for b in active]), batch_slots)
            for i, b in enumerate(active):
                ys[b, pos[b]:pos[b] + n] = y[i]
                pos[b] += n
        tick += 1
    return ys


def check_parity(path, reference, record=None, B=4, T=STEPS, chunk_max=1, seed=0, device="cpu",
                 stagger=3, on_load=None):
    rng = np.random.default_rng(seed)
    cell = load_cell(path, device=device, capacity=3 * B)
    if on_load is not None:
        on_load(cell)
    slots = rng.permutation(3 * B)[:B].astype(np.int64)  # scattered, not 0..B-1
    xs = _inputs(cell, B, T, rng)
    h0, c0 = _initial_state(cell, B, rng)
    want = reference(path, xs, h0, c0)
    for b, s in enumerate(slots):
        cell.reset(s, h0[:, b], None if c0 is None else c0[:, b])
    got = stream(cell, xs, slots, rng, chunk_max, stagger)
    errs = {"y": float(np.abs(got - want[0]).max())}
    states = cell.read_many(slots)
    errs["hn"] = float(np.abs(states["h"].transpose(1, 0, 2) - want[1]).max())
    if c0 is not None:
        errs["cn"] = float(np.abs(states["c"].transpose(1, 0, 2) - want[2]).max())
    if record is not None:  # shows in --junitxml: the worst errors for the report
        record("max_abs", max(errs.values()))
    assert max(errs.values()) <= TOL, errs
    return errs


@pytest.mark.parametrize("hidden,features,normalize", [(8, 1, False), (64, 5, True)])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_torch_exports(model_file, reference, record_property, cell, layers, hidden, features,
                       normalize):
    path = model_file("torch", cell=cell, layers=layers, hidden=hidden, features=features,
                      normalize=normalize)
    check_parity(path, reference, record=record_property)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_hidden_256(model_file, reference, record_property, cell):
    path = model_file("torch", cell=cell, layers=1, hidden=256, features=5, normalize=True)
    check_parity(path, reference, record=record_property, B=3)


@pytest.mark.parametrize("activation", ["softmax", None])
def test_token_input(model_file, reference, record_property, activation):
    path = model_file("torch", cell="lstm", layers=2, hidden=32, vocab=50, embed=12, out=7,
                      activation=activation)
    check_parity(path, reference, record=record_property)


def test_sigmoid_head(model_file, reference, record_property):
    path = model_file("torch", cell="gru", layers=2, hidden=16, features=3, activation="sigmoid")
    check_parity(path, reference, record=record_property)


@pytest.mark.parametrize("layers,hidden", [(1, 8), (2, 32)])
def test_peephole_lstm(model_file, reference, record_property, layers, hidden):
    path = model_file("onnx", op="LSTM", layers=layers, hidden=hidden, peephole=True)
    check_parity(path, reference, record=record_property)


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("layers", [1, 2])
def test_hand_built_gru(model_file, reference, record_property, layers, lbr):
    path = model_file("onnx", op="GRU", layers=layers, hidden=16, linear_before_reset=lbr)
    check_parity(path, reference, record=record_property)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_chunks(model_file, reference, record_property, cell):
    """step_chunk with random chunk lengths gives the same as whole sequences."""
    path = model_file("torch", cell=cell, layers=2, hidden=16, features=2)
    check_parity(path, reference, record=record_property, chunk_max=7, seed=1)


def test_chunked_peephole_and_lbr0(model_file, reference, record_property):
    check_parity(model_file("onnx", op="LSTM", layers=2, hidden=8, peephole=True), reference,
                 record=record_property, chunk_max=5)
    check_parity(model_file("onnx", op="GRU", layers=2, hidden=8, linear_before_reset=0), reference,
                 record=record_property, chunk_max=5)


def test_batch_composition_does_not_change_numbers(model_file):
    """A session's outputs are bit-identical alone or inside a batch (no reassociation).

    Batches this small stay on the tile kernels; big batches take the GEMM path,
    whose sgemm sums in another order: test_gemm.py bounds that at 1e-5."""
    assert 13 < cpu_gemm.GEMM_MIN_BATCH or cpu_gemm.GEMM_MIN_BATCH == 0
    path = model_file("torch", cell="lstm", layers=2, hidden=64, features=5)
    rng = np.random.default_rng(3)
    alone, batched = load_cell(path, device="cpu", capacity=16), load_cell(path, device="cpu", capacity=16)
    x = rng.standard_normal((20, 13, 5)).astype(np.float32)
    for t in range(20):
        ya = alone.step(x[t, 12:13], np.array([0]))
        yb = batched.step(x[t], np.arange(13)[::-1].copy())
        np.testing.assert_array_equal(ya[0], yb[12])
    np.testing.assert_array_equal(alone.read(0)["h"], batched.read(0)["h"])
