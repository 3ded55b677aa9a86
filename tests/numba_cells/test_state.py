"""Slot arrays: isolation between sessions, reset/read/write/copy round trips,
grow, and clear errors for bad calls (nothing changes when a call is refused)."""
from __future__ import annotations

import numpy as np
import pytest

from numba_cells import CellError, load_cell


@pytest.fixture(params=["lstm", "gru", "rnn"])
def cell(request, model_file):
    path = model_file("torch", cell=request.param, layers=2, hidden=16, features=3)
    return load_cell(path, device="cpu", capacity=8)


def _all_states(cell):
    return {k: v.copy() for k, v in cell.read_many(np.arange(cell.capacity)).items()}


def _x(cell, B, seed=0):
    return np.random.default_rng(seed).standard_normal((B, cell.spec.input_features)).astype(np.float32)


def test_spec_and_device(cell):
    s = cell.spec
    assert (s.layers, s.hidden, s.input_kind, s.input_features, s.output_size) == (2, 16, "float", 3, 2)
    assert s.has_cell_state == (s.cell == "lstm")
    assert cell.device == "cpu" and cell.capacity == 8


def test_slot_isolation(cell):
    """Stepping slots 2 and 5 changes exactly those slots' state."""
    before = _all_states(cell)
    cell.step(_x(cell, 2), np.array([5, 2]))
    after = _all_states(cell)
    for name in before:
        changed = np.abs(after[name] - before[name]).reshape(cell.capacity, -1).max(axis=1) > 0
        assert changed.tolist() == [i in (2, 5) for i in range(cell.capacity)], name


def test_same_input_same_state_different_slots(cell):
    """Two slots fed the same inputs end in the same state whatever they share a batch with."""
    rng = np.random.default_rng(1)
    for t in range(10):
        x = rng.standard_normal((3, 3)).astype(np.float32)
        x[2] = x[0]
        cell.step(x, np.array([1, 4, 6]))
    np.testing.assert_array_equal(cell.read(1)["h"], cell.read(6)["h"])
    assert not np.array_equal(cell.read(1)["h"], cell.read(4)["h"])


def test_read_write_round_trip(cell):
    rng = np.random.default_rng(2)
    h = rng.standard_normal((2, 16)).astype(np.float32)
    c = rng.standard_normal((2, 16)).astype(np.float32) if cell.spec.has_cell_state else None
    cell.write(3, h, c)
    got = cell.read(3)
    np.testing.assert_array_equal(got["h"], h)
    if c is not None:
        np.testing.assert_array_equal(got["c"], c)
    got["h"][:] = 99  # read returns a copy
    np.testing.assert_array_equal(cell.read(3)["h"], h)


def test_reset_zero_and_given(cell):
    cell.step(_x(cell, 1), np.array([0]))
    assert np.abs(cell.read(0)["h"]).max() > 0
    cell.reset(0)
    for v in cell.read(0).values():
        assert not v.any()
    h = np.full((2, 16), 0.25, np.float32)
    cell.reset(0, h=h)
    np.testing.assert_array_equal(cell.read(0)["h"], h)


def test_copy_forks_a_session(cell):
    """After copy(a, b), both give identical outputs for identical inputs; then diverge."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        cell.step(rng.standard_normal((1, 3)).astype(np.float32), np.array([1]))
    cell.copy(1, 7)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    x[1] = x[0]
    y = cell.step(x, np.array([1, 7]))
    np.testing.assert_array_equal(y[0], y[1])
    cell.step(x[:1] + 1, np.array([7]))
    assert not np.array_equal(cell.read(1)["h"], cell.read(7)["h"])


def test_grow_keeps_state(cell):
    cell.step(_x(cell, 3), np.array([0, 4, 7]))
    before = _all_states(cell)
    cell.grow(20)
    assert cell.capacity == 20
    after = cell.read_many(np.arange(20))
    for name in before:
        np.testing.assert_array_equal(after[name][:8], before[name])
        assert not after[name][8:].any()
    cell.step(_x(cell, 1), np.array([19]))  # new slots work
    with pytest.raises(CellError, match="shrink"):
        cell.grow(4)


@pytest.mark.parametrize("x_shape,slots,message", [
    ((2, 3), [1, 1], "appears more than once"),
    ((2, 3), [1, 8], r"slot 8 \(row 1\) is out of range"),
    ((2, 3), [-1, 0], "out of range"),
    ((2, 4), [0, 1], r"x must have shape \(B, 3\)"),
    ((3, 3), [0, 1], "B=2"),
    ((2, 3), [[0, 1]], "slots must be 1-D"),
])
def test_bad_step_is_refused_and_changes_nothing(cell, x_shape, slots, message):
    before = _all_states(cell)
    with pytest.raises(CellError, match=message):
        cell.step(np.ones(x_shape, np.float32), np.array(slots))
    after = _all_states(cell)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_bad_dtypes_and_state_shapes(cell):
    with pytest.raises(CellError, match="float32 features"):
        cell.step(np.ones((1, 3), np.int64), np.array([0]))
    with pytest.raises(CellError, match="integers"):
        cell.step(np.ones((1, 3), np.float32), np.array([0.5]))
    with pytest.raises(CellError, match=r"shape \(layers, hidden\)"):
        cell.write(0, np.zeros((3, 16)), np.zeros((3, 16)))
    with pytest.raises(CellError, match="out of range"):
        cell.read(8)
    with pytest.raises(CellError, match="NaN"):
        cell.reset(0, h=np.full((2, 16), np.nan))
    if not cell.spec.has_cell_state:
        with pytest.raises(CellError, match="no cell state"):
            cell.write(0, np.zeros((2, 16)), np.zeros((2, 16)))
    with pytest.raises(ValueError):  # CellError is a ValueError: one-line CLI messages
        cell.step_chunk(np.ones((1, 3), np.float32), np.array([0]))


def test_token_errors(model_file):
    cell = load_cell(model_file("torch", cell="gru", layers=1, hidden=8, vocab=20, embed=4),
                     device="cpu", capacity=4)
    assert cell.spec.input_kind == "tokens" and cell.spec.input_features == 20
    with pytest.raises(CellError, match="token id 20 .*vocabulary of 20"):
        cell.step(np.array([3, 20]), np.array([0, 1]))
    with pytest.raises(CellError, match="int64 token ids"):
        cell.step(np.ones(2, np.float32), np.array([0, 1]))
    assert not cell.read(0)["h"].any()  # the refused call changed nothing
    y = cell.step_chunk(np.array([[1, 2, 3]]), np.array([2]))
    assert y.shape == (1, 3, 2)


def test_empty_batch(cell):
    assert cell.step(np.zeros((0, 3), np.float32), np.zeros(0, np.int64)).shape == (0, 2)
    assert cell.step_chunk(np.zeros((2, 0, 3), np.float32), np.array([0, 1])).shape == (2, 0, 2)


def test_step_one_equals_step_and_keeps_the_checks(cell, model_file):
    """The serving layer's lone-step path gives step()'s numbers, state and errors."""
    twin = load_cell(model_file("torch", cell=cell.spec.cell, layers=2, hidden=16, features=3),
                     device="cpu", capacity=8)
    rng = np.random.default_rng(7)
    for _ in range(5):
        x = rng.standard_normal((1, 3)).astype(np.float32)
        np.testing.assert_array_equal(cell.step_one(x, 3), twin.step(x, np.array([3])))
    np.testing.assert_array_equal(cell.read(3)["h"], twin.read(3)["h"])
    # another dtype or layout takes step()'s path, with its conversions and checks
    x64 = rng.standard_normal((1, 3))
    np.testing.assert_array_equal(cell.step_one(x64, 4), twin.step(x64.astype(np.float32), np.array([4])))
    with pytest.raises(CellError, match="out of range"):
        cell.step_one(np.zeros((1, 3), np.float32), 8)
    with pytest.raises(CellError, match=r"x must have shape \(B, 3\)"):
        cell.step_one(np.zeros((1, 2), np.float32), 0)


def test_step_one_tokens(model_file):
    path = model_file("torch", cell="lstm", layers=1, hidden=8, vocab=20, embed=4)
    a, b = load_cell(path, device="cpu", capacity=4), load_cell(path, device="cpu", capacity=4)
    for tok in (3, 7, 19):
        np.testing.assert_array_equal(a.step_one(np.array([tok], np.int64), 1), b.step(np.array([tok]), [1]))
    with pytest.raises(CellError, match="token id 20 .*vocabulary of 20"):
        a.step_one(np.array([20], np.int64), 1)
    np.testing.assert_array_equal(a.read(1)["h"], b.read(1)["h"])  # the refused step changed nothing


def test_step_into_writes_steps_output_in_place(cell, model_file):
    twin = load_cell(model_file("torch", cell=cell.spec.cell, layers=2, hidden=16, features=3),
                     device="cpu", capacity=8)
    rows = np.full((8, 2), 7.0, np.float32)  # rows[5] receives slot 5's output
    for t, vals in enumerate(([0.1, -0.2, 0.3], [1.0, 0.5, -1.5])):
        assert cell.step_into(vals, 5, rows) is True
        np.testing.assert_array_equal(rows[5], twin.step(np.array([vals], np.float32), [5])[0])
        np.testing.assert_array_equal(cell.read(5)["h"], twin.read(5)["h"])
    assert (np.delete(rows, 5, axis=0) == 7.0).all()
    before = rows.copy()
    for bad in (8, -1):
        with pytest.raises(CellError, match="out of range"):
            cell.step_into([0.0, 0.0, 0.0], bad, rows)
    np.testing.assert_array_equal(rows, before)  # a refused step writes nothing
    np.testing.assert_array_equal(cell.read(5)["h"], twin.read(5)["h"])
    with pytest.raises(CellError, match="out of range"):  # a slot past the table, not the cell
        cell.step_into([0.0] * 3, 5, rows[:4])
    # layouts this path does not take: the caller's other path
    assert cell.step_into([0.0] * 3, 5, np.zeros((8, 4), np.float32)[:, ::2]) is False
    assert cell.step_into([0.0] * 3, 5, np.zeros((8, 2), np.float64)) is False
    assert cell.step_into([0.0] * 3, 5, np.zeros((8, 3), np.float32)) is False


def test_step_into_calls_the_compiled_kernel_past_the_dispatcher(cell, model_file):
    """step_into calls the single-slot kernel's compiled entry (no per-call
    typing): the same numbers as the batched kernel, before and after the
    state arrays are reallocated by grow(), and an array of the wrong dtype is
    refused rather than read."""
    from numba_cells.cell import compiled_entry
    from numba_cells import cpu

    kernel = cpu.ONE[cell.spec.cell]
    assert cell._one_kernel is not kernel and cell._one_kernel is compiled_entry(kernel)
    twin = load_cell(model_file("torch", cell=cell.spec.cell, layers=2, hidden=16, features=3),
                     device="cpu", capacity=8)
    rows = np.zeros((32, 2), np.float32)
    vals = [0.3, -0.1, 0.7]
    cell.step_into(vals, 3, rows)
    cell.grow(32)
    twin.grow(32)
    for slot in (3, 20):  # slot 20 exists only in the grown arrays
        cell.step_into(vals, slot, rows)
    twin.step(np.array([vals], np.float32), [3])  # slot 3's first step
    want = twin.step(np.array([vals, vals], np.float32), [3, 20])
    np.testing.assert_array_equal(rows[[3, 20]], want)
    np.testing.assert_array_equal(cell.read(20)["h"], twin.read(20)["h"])
    st = cell._state
    with pytest.raises(TypeError):
        cell._one_kernel(cell._xrow, 0, st.h.astype(np.float64), st.c, rows, st.params, st.meta,
                         st.one_work)


def test_native_step_is_the_single_slot_kernel_as_a_c_function(cell, model_file):
    """Cell.native_step(): the address of the same kernel compiled as a C function
    (raw pointers and sizes in). Called through ctypes on one_state's arrays it
    gives the batched kernel's numbers bit for bit, and refuses a slot past the
    arrays (code 1) without writing."""
    import ctypes

    f32, i64 = ctypes.POINTER(ctypes.c_float), ctypes.c_int64
    proto = ctypes.CFUNCTYPE(i64, f32, i64, f32, i64, f32, i64, f32, i64, f32, i64,
                             ctypes.POINTER(i64), i64, f32, i64)
    assert cell.one_address == 0  # compiled only when asked for
    fn = proto(cell.native_step())
    assert cell.one_address == cell.native_step() != 0
    st = cell.one_state
    twin = load_cell(model_file("torch", cell=cell.spec.cell, layers=2, hidden=16, features=3),
                     device="cpu", capacity=8)
    rows = np.zeros((8, 2), np.float32)

    def call(x, slot):
        p = lambda a: a.ctypes.data_as(f32)  # noqa: E731
        return fn(p(x), slot, p(st.h), st.h.shape[0], p(st.c), st.c.shape[0], p(rows), rows.shape[0],
                  p(st.params), st.params.size, st.meta.ctypes.data_as(ctypes.POINTER(i64)),
                  st.meta.size, p(st.one_work), st.one_work.size)

    for t in range(5):
        x = _x(cell, 1, seed=t)
        assert call(x, 6) == 0
        want = twin.step(x, [6])
        np.testing.assert_array_equal(rows[6], want[0])
    np.testing.assert_array_equal(cell.read(6)["h"], twin.read(6)["h"])
    before = rows.copy()
    assert call(_x(cell, 1), 8) == 1  # past the 8 slots: refused
    np.testing.assert_array_equal(rows, before)


def test_native_step_of_a_one_slot_lstm_reads_its_whole_cell_state(model_file):
    """capacity 1: h and c are (1, L, H) tables, not the (1, 1, 1) dummy a GRU's c is."""
    import ctypes

    path = model_file("torch", cell="lstm", layers=2, hidden=16, features=3)
    cell, twin = load_cell(path, device="cpu", capacity=1), load_cell(path, device="cpu", capacity=1)
    f32, i64 = ctypes.POINTER(ctypes.c_float), ctypes.c_int64
    fn = ctypes.CFUNCTYPE(i64, f32, i64, f32, i64, f32, i64, f32, i64, f32, i64,
                          ctypes.POINTER(i64), i64, f32, i64)(cell.native_step())
    st, rows = cell.one_state, np.zeros((1, 2), np.float32)
    p = lambda a: a.ctypes.data_as(f32)  # noqa: E731
    for t in range(4):
        x = _x(cell, 1, seed=t)
        assert fn(p(x), 0, p(st.h), 1, p(st.c), 1, p(rows), 1, p(st.params), st.params.size,
                  st.meta.ctypes.data_as(ctypes.POINTER(i64)), st.meta.size, p(st.one_work),
                  st.one_work.size) == 0
        np.testing.assert_array_equal(rows[0], twin.step(x, [0])[0])
    np.testing.assert_array_equal(cell.read(0)["c"], twin.read(0)["c"])
