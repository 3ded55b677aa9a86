"""The big-batch GEMM path (one sgemm per layer, cpu_gemm.py) against ONNX Runtime, and a
session's numbers in a big batch against the same session stepped alone (tile path)."""
from __future__ import annotations

import numpy as np
import pytest

from numba_cells import cpu_gemm, load_cell
from numba_cells.blas import gemm_ready
from tests.numba_cells.test_parity import check_parity

pytestmark = pytest.mark.skipif(not gemm_ready(), reason="needs SciPy's BLAS and threadpoolctl")


def _gemm_always(cell):
    """Route every batch, even B=1, through the GEMM path (the streams here are small)."""
    assert cell._state.gemm is not None, "this cell should have a GEMM path"
    cell._state.gemm_min = 1


@pytest.mark.parametrize("layers,hidden,features,normalize", [(1, 8, 1, False), (2, 64, 5, True),
                                                              (3, 16, 2, False)])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_gemm_parity(model_file, reference, record_property, cell, layers, hidden, features,
                     normalize):
    path = model_file("torch", cell=cell, layers=layers, hidden=hidden, features=features,
                      normalize=normalize)
    check_parity(path, reference, record=record_property, on_load=_gemm_always)


def test_gemm_tokens_peepholes_chunks(model_file, reference, record_property):
    check_parity(model_file("torch", cell="lstm", layers=2, hidden=32, vocab=50, embed=12, out=7,
                            activation="softmax"),
                 reference, record=record_property, on_load=_gemm_always)
    check_parity(model_file("onnx", op="LSTM", layers=2, hidden=32, peephole=True), reference,
                 record=record_property, on_load=_gemm_always, chunk_max=5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gemm_big_batch_parity(model_file, reference, record_property, cell):
    """Batches above the default threshold, as the server would send them."""
    path = model_file("torch", cell=cell, layers=2, hidden=32, features=3)
    B = cpu_gemm.GEMM_MIN_BATCH + 8
    check_parity(path, reference, record=record_property, B=B, T=30, stagger=0)


def test_big_batch_matches_alone(model_file):
    """A session inside a big batch (GEMM path) gives its numbers alone (tile path) to 1e-5.

    Not bit-identical: sgemm sums in its own blocked order and adds the bias last
    (cpu_gemm.py). Batches below GEMM_MIN_BATCH stay bit-identical (test_parity.py)."""
    path = model_file("torch", cell="lstm", layers=2, hidden=64, features=5)
    B = max(cpu_gemm.GEMM_MIN_BATCH, 1) + 5
    rng = np.random.default_rng(4)
    alone = load_cell(path, device="cpu", capacity=B)
    batched = load_cell(path, device="cpu", capacity=B)
    assert batched._state.gemm is not None and B >= batched._state.gemm_min
    x = (1.5 * rng.standard_normal((40, B, 5))).astype(np.float32)
    order = rng.permutation(B).astype(np.int64)  # row i steps session (slot) order[i]
    row = int(np.flatnonzero(order == 0)[0])  # where session 0 sits in the big batch
    worst = 0.0
    for t in range(40):
        ya = alone.step(x[t, :1], np.array([0]))
        yb = batched.step(x[t, order], order)
        worst = max(worst, float(np.abs(ya[0] - yb[row]).max()))
    sa, sb = alone.read(0), batched.read(0)
    worst = max(worst, float(np.abs(sa["h"] - sb["h"]).max()), float(np.abs(sa["c"] - sb["c"]).max()))
    assert worst <= 1e-5, worst


def test_every_cell_has_a_gemm_path(model_file):
    for kind in ("lstm", "gru", "rnn"):
        cell = load_cell(model_file("torch", cell=kind, layers=1, hidden=8), device="cpu", capacity=2)
        assert cell._state.gemm is cpu_gemm.RUNNERS[kind], kind


def test_scipy_blas_pinned_to_one_thread():
    """The cell is single-threaded: SciPy's BLAS (the one np.dot uses in Numba) runs on one
    thread once the GEMM path is on (blas.py; the default SEQSERVE_CELL_BLAS_THREADS)."""
    import os

    import scipy
    from threadpoolctl import threadpool_info

    root = os.path.dirname(os.path.realpath(scipy.__file__))
    libs = [lib for lib in threadpool_info() if lib["user_api"] == "blas"
            and os.path.realpath(lib["filepath"]).startswith((root + os.sep, root + ".libs" + os.sep))]
    assert libs and all(lib["num_threads"] == 1 for lib in libs), libs


def test_gemm_gru_both_reset_placements_and_tokens(model_file, reference, record_property):
    """GRU's three-sgemm layer: linear_before_reset 1 (torch's export) and 0 (a
    hand-built ONNX GRU), and a token-input GRU with a softmax head."""
    check_parity(model_file("onnx", op="GRU", layers=2, hidden=16, linear_before_reset=0), reference,
                 record=record_property, on_load=_gemm_always, chunk_max=4)
    check_parity(model_file("torch", cell="gru", layers=2, hidden=24, vocab=40, embed=8, out=5,
                            activation="softmax"),
                 reference, record=record_property, on_load=_gemm_always)
