"""The streaming cell: slot arrays of live sessions' state and one step at a time.

    cell = load_cell("model.onnx", device="auto", capacity=1024)
    y = cell.step(x, slots)          # x (B, F) float32 or (B,) int64 ids -> y (B, out)
    y = cell.step_chunk(x, slots)    # x (B, T, F) or (B, T) -> y (B, T, out)

Which session owns which slot is the serving layer's business; the cell only
holds `h[slot, layer, hidden]` (and `c` for LSTM) and advances the rows asked
for, in place. Kernels are compiled and run once at load (warm-up on scratch
arrays), so no client's first step pays for compilation.

Not thread-safe: one caller at a time (the serving layer batches steps).
"""
from __future__ import annotations

import os

import numpy as np

from numba_cells.blas import gemm_ready
from numba_cells.onnx_model import CellError, CellSpec, load_spec
from numba_cells.packing import pack

DEVICES = ("auto", "cpu", "cuda")


def cuda_available(simulator_ok: bool = True) -> bool:
    """A real GPU, or (if simulator_ok) the simulator when NUMBA_ENABLE_CUDASIM=1."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return simulator_ok
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # no driver, no toolkit: CPU it is
        return False


def compiled_entry(dispatcher):
    """How Cell.step_into calls the single-slot kernel: the compiled function of
    its one signature, past Numba's dispatch, else the dispatcher itself.

    The dispatcher types every argument on every call before it picks the
    compiled function: ~0.4 us of a ~4.5 us call in a hot loop, and 2-4 us
    after the caches went cold between two of a stream's messages (measured
    after evicting 8 MB). The entry point still unboxes each argument and
    refuses an array of another dtype or rank (TypeError); it does not check
    the layout, which step_into checks once per table (every other array is
    the state's own, always C-contiguous). Numba is pinned in pyproject.toml;
    `overloads[sig].entry_point` is the compiled overload's Python entry.
    """
    sigs = dispatcher.signatures
    if len(sigs) == 1:
        entry = getattr(dispatcher.overloads.get(sigs[0]), "entry_point", None)
        if callable(entry):
            return entry
    return dispatcher


class _CpuState:
    """Slot arrays in host memory and the CPU kernels that advance them."""

    device = "cpu"

    def __init__(self, spec: CellSpec, capacity: int):
        from numba_cells import cpu, cpu_gemm  # compiled (or loaded from cache) on first use

        self.spec = spec
        self.params, self.meta = pack(spec)
        self.serial, self.parallel = cpu.RUNNERS[spec.cell]
        self.one = cpu.ONE[spec.cell] if spec.input_kind != "tokens" else None  # Cell.step_into
        self.one_work = (np.zeros(cpu.one_work_size(self.meta), np.float32)  # its reused scratch
                         if self.one is not None else None)
        self.parallel_min = cpu.PARALLEL_MIN_BATCH
        # big batches: one sgemm per layer instead of tiles (see cpu.py, GEMM path)
        self.gemm = cpu_gemm.RUNNERS.get(spec.cell)
        if not (self.gemm is not None and cpu_gemm.GEMM_MIN_BATCH > 0
                and cpu_gemm.layout_ok(self.meta, spec.gates * spec.hidden, spec.cell) and gemm_ready()):
            self.gemm = None
        self.gemm_min = cpu_gemm.GEMM_MIN_BATCH
        self.h = np.zeros((capacity, spec.layers, spec.hidden), np.float32)
        self.c = (np.zeros_like(self.h) if spec.has_cell_state
                  else np.zeros((1, 1, 1), np.float32))
        self.seen = np.zeros(capacity, np.uint8)
        self._dummy_x = np.zeros((1, 1, 1), np.float32)
        self._dummy_tok = np.zeros((1, 1), np.int64)

    def advance(self, x, tok, slots, B, T):
        """x (B, T, F) float32 or None, tok (B, T) int64 or None -> y (B, T, out)."""
        y = np.empty((B, T, self.spec.output_size), np.float32)
        if self.gemm is not None and B >= self.gemm_min:
            run = self.gemm
        else:
            run = self.parallel if 0 < self.parallel_min <= B else self.serial
        code, row = run(self._dummy_x if x is None else x, self._dummy_tok if tok is None else tok,
                        slots, self.h, self.c, y, self.params, self.meta, self.seen)
        return y, code, row

    def warm_up(self):
        """Compile (or load from Numba's cache) every runner this state uses, on scratch state."""
        h = np.zeros((1,) + self.h.shape[1:], np.float32)
        c = np.zeros_like(h) if self.spec.has_cell_state else self.c
        x, tok = _zeros_input(self.spec, 1, 1)
        slots = np.zeros(1, np.int64)
        runs = ([self.serial] + ([self.parallel] if self.parallel_min > 0 else [])
                + ([self.gemm] if self.gemm is not None else []))
        for run in runs:
            y = np.empty((1, 1, self.spec.output_size), np.float32)
            run(self._dummy_x if x is None else x, self._dummy_tok if tok is None else tok,
                slots, h, c, y, self.params, self.meta, np.zeros(1, np.uint8))
        if self.one is not None:
            self.one(x, 0, h, c, np.empty((1, self.spec.output_size), np.float32),
                     self.params, self.meta, self.one_work)

    # state access: host arrays, so plain numpy
    def get(self, slot):
        out = {"h": self.h[slot].copy()}
        if self.spec.has_cell_state:
            out["c"] = self.c[slot].copy()
        return out

    def set(self, slot, h, c):
        self.h[slot] = h
        if c is not None:
            self.c[slot] = c

    def zero(self, slot):
        self.h[slot] = 0.0
        if self.spec.has_cell_state:
            self.c[slot] = 0.0

    def copy(self, src, dst):
        self.h[dst] = self.h[src]
        if self.spec.has_cell_state:
            self.c[dst] = self.c[src]

    def grow(self, capacity):
        h = np.zeros((capacity,) + self.h.shape[1:], np.float32)
        h[: self.h.shape[0]] = self.h
        self.h = h
        if self.spec.has_cell_state:
            c = np.zeros_like(h)
            c[: self.c.shape[0]] = self.c
            self.c = c
        self.seen = np.zeros(capacity, np.uint8)


def _zeros_input(spec: CellSpec, B: int, T: int):
    if spec.input_kind == "tokens":
        return None, np.zeros((B, T), np.int64)
    return np.zeros((B, T, spec.input_features), np.float32), None


class Cell:
    """Preallocated per-session state plus kernels that step it (see module doc)."""

    def __init__(self, spec: CellSpec, device: str = "auto", capacity: int = 1024):
        if device not in DEVICES:
            raise CellError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
        capacity = int(capacity)
        if capacity < 1:
            raise CellError(f"capacity must be at least 1, got {capacity}")
        if device == "auto":  # a real GPU only: the simulator is for tests, and slow
            device = "cuda" if cuda_available(simulator_ok=False) else "cpu"
        if device == "cuda":
            if not cuda_available():
                raise CellError("device='cuda' asked for but no CUDA GPU is available "
                                "(set NUMBA_ENABLE_CUDASIM=1 to use the simulator)")
            from numba_cells.cuda_cell import CudaState
            self._state = CudaState(spec, capacity)
        else:
            self._state = _CpuState(spec, capacity)
        self.spec = spec
        self.device = self._state.device
        self.capacity = capacity
        self._tokens = spec.input_kind == "tokens"
        self._F = spec.input_features
        # step_one's reused slot array, and the input dtype its fast path takes
        self._one = np.zeros(1, np.int64)
        self._xrow = np.zeros((1, 1, self._F), np.float32)  # step_into's input buffer
        self._xflat = self._xrow.reshape(-1)
        self._rows_seen = None  # the last rows table step_into checked
        self._fast = None if self.device != "cpu" else np.dtype(np.int64 if self._tokens else np.float32)
        self._state.warm_up()
        one = getattr(self._state, "one", None)  # the single-slot kernel, compiled by warm_up
        self._one_kernel = compiled_entry(one) if one is not None and not self._tokens else None
        # The same kernel for a native caller (see native_step): its C address, 0 until
        # asked for, and the state whose arrays it takes (h, c, params, meta, one_work).
        self.one_address = 0
        self.one_state = self._state if self._one_kernel is not None else None

    def native_step(self) -> int:
        """The address of the single-slot kernel as a C function (cpu.one_cfunc: its
        arguments are raw pointers and sizes), compiled on first call; 0 where
        step_into does not apply (token input, the CUDA cell). After it, a
        native caller steps a slot with one_state's arrays, as step_into does."""
        if self.one_state is not None and not self.one_address:
            from numba_cells import cpu
            self.one_address = cpu.one_cfunc(self.spec.cell).address
        return self.one_address

    # ------------------------------------------------------------ stepping
    def step(self, x, slots):
        """x (B, F) float32 or (B,) int64 token ids; slots (B,) -> y (B, out) float32."""
        slots = self._slots(slots)
        B = slots.shape[0]
        x, tok = self._inputs(x, B, chunk=False)
        if B == 0:
            return np.zeros((0, self.spec.output_size), np.float32)
        y = self._run(x, tok, slots, B, 1)
        return y.reshape(B, self.spec.output_size)

    def step_chunk(self, x, slots):
        """x (B, T, F) or (B, T) token ids -> y (B, T, out): T steps per session, in order."""
        slots = self._slots(slots)
        B = slots.shape[0]
        x, tok = self._inputs(x, B, chunk=True)
        T = (tok if x is None else x).shape[1]
        if B == 0 or T == 0:
            return np.zeros((B, T, self.spec.output_size), np.float32)
        return self._run(x, tok, slots, B, T)

    def step_one(self, x, slot: int):
        """One session's next step: the serving layer's lone-step path.

        x (1, F) float32 or (1,) int64 ids; slot an int -> y (1, out) float32.
        The same arithmetic as step(x, [slot]) without its per-call Python
        checks and allocations (the slot array is reused); the kernel still
        checks the slot range and token ids. Anything unusual (another
        dtype, a non-contiguous x, the CUDA cell) goes through step().
        """
        st = self._state
        if self._fast is None or x.dtype != self._fast or not x.flags.c_contiguous:
            return self.step(x, (slot,))
        if self._tokens:
            if x.shape != (1,):
                return self.step(x, (slot,))
            xin, tok = st._dummy_x, x.reshape(1, 1)
        else:
            if x.shape != (1, self._F):
                return self.step(x, (slot,))
            xin, tok = x.reshape(1, 1, self._F), st._dummy_tok
        y = np.empty((1, 1, self.spec.output_size), np.float32)
        self._serial_one(xin, tok, slot, y)
        return y.reshape(1, self.spec.output_size)

    def step_into(self, values, slot: int, rows) -> bool:
        """One step of one float-input session, its output written into rows[slot].

        values: the F input floats (any sequence; checked finite by the
        caller); rows: float32 C-contiguous (n, out), e.g. the serving layer's
        table of each session's last output. The serving layer's hot path:
        no array is built per call (the input goes into a reused buffer) and
        the single-slot kernel (cpu.ONE) takes a plain int slot, so it costs
        about half of step_one. rows[slot] is left as it was if the kernel
        refuses the slot. False (nothing done) where this path does not
        apply: token input, the CUDA cell, rows of another dtype, layout or
        width.
        """
        one = self._one_kernel
        if rows is not self._rows_seen:  # the layout check, once per table (not per step)
            if one is None or rows.dtype != np.float32 or not rows.flags.c_contiguous \
                    or rows.ndim != 2 or rows.shape[1] != self.spec.output_size:
                return False
            self._rows_seen = rows
        x = self._xflat
        if self._F == 1:
            x[0] = values[0]
        else:
            x[:] = values
        st = self._state
        if one(self._xrow, slot, st.h, st.c, rows, st.params, st.meta, st.one_work):  # the one refusal
            raise CellError(f"slot {slot} is out of range [0, {min(self.capacity, len(rows))})")
        return True

    def _serial_one(self, xin, tok, slot, y):
        """The serial kernel on one slot (the reused slot array): y (1, 1, out) filled."""
        st, one = self._state, self._one
        one[0] = slot
        code, row = st.serial(xin, tok, one, st.h, st.c, y, st.params, st.meta, st.seen)
        if code:
            self._fail(code, row, one, tok)

    def _run(self, x, tok, slots, B, T):
        y, code, row = self._state.advance(x, tok, slots, B, T)
        if code:
            self._fail(code, row, slots, tok)
        return y

    def _fail(self, code, row, slots, tok):
        from numba_cells.cpu import ERR_SLOT_DUP, ERR_SLOT_RANGE
        if code == ERR_SLOT_RANGE:
            raise CellError(f"slot {int(slots[row])} (row {row}) is out of range "
                            f"[0, {self.capacity})")
        if code == ERR_SLOT_DUP:
            raise CellError(f"slot {int(slots[row])} appears more than once in the batch "
                            f"(again at row {row}): one step per session per call")
        bad = tok[row][(tok[row] < 0) | (tok[row] >= self._F)]
        raise CellError(f"token id {int(bad[0])} (row {row}) is outside the vocabulary "
                        f"of {self._F}")

    def _slots(self, slots) -> np.ndarray:
        s = np.asarray(slots)
        if s.dtype != np.int64:
            if s.size and s.dtype.kind not in "iu":
                raise CellError(f"slots must be integers, got dtype {s.dtype}")
            s = s.astype(np.int64)
        if s.ndim != 1:
            raise CellError(f"slots must be 1-D (B,), got shape {s.shape}")
        return np.ascontiguousarray(s)

    def _inputs(self, x, B, chunk):
        """-> (x float32 (B, T, F) or None, tok int64 (B, T) or None), checked."""
        a = np.asarray(x)
        want = "(B, T)" if chunk else "(B,)"
        if self._tokens:
            if a.dtype.kind not in "iu":
                raise CellError(f"this model reads int64 token ids, got dtype {a.dtype}")
            if a.ndim != (2 if chunk else 1) or a.shape[0] != B:
                raise CellError(f"token ids must have shape {want} with B={B} (one row per slot), "
                                f"got {a.shape}")
            tok = np.ascontiguousarray(a, dtype=np.int64)
            return None, (tok if chunk else tok.reshape(B, 1))
        if a.dtype.kind != "f":
            raise CellError(f"this model reads float32 features, got dtype {a.dtype}")
        F = self._F
        want = f"(B, T, {F})" if chunk else f"(B, {F})"
        if a.ndim != (3 if chunk else 2) or a.shape[0] != B or a.shape[-1] != F:
            raise CellError(f"x must have shape {want} with B={B} (one row per slot), got {a.shape}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        return (a if chunk else a.reshape(B, 1, F)), None

    # ------------------------------------------------------------ state access
    def _slot(self, slot) -> int:
        try:
            s = int(slot)
        except (TypeError, ValueError):
            raise CellError(f"slot must be an integer, got {slot!r}") from None
        if s != slot or not 0 <= s < self.capacity:
            raise CellError(f"slot {slot!r} is out of range [0, {self.capacity})")
        return s

    def _state_array(self, name, value):
        shape = (self.spec.layers, self.spec.hidden)
        a = np.asarray(value, dtype=np.float32)
        if a.shape != shape:
            raise CellError(f"{name} must have shape (layers, hidden) = {shape}, got {a.shape}")
        if not np.isfinite(a).all():
            raise CellError(f"{name} holds NaN or infinite values")
        return a

    def _check_c(self, c):
        if c is None:
            return None
        if not self.spec.has_cell_state:
            raise CellError(f"a {self.spec.cell.upper()} has no cell state: do not pass c")
        return self._state_array("c", c)

    def reset(self, slot, h=None, c=None):
        """Zero a slot's state, or set the given initial state."""
        s = self._slot(slot)
        hh = None if h is None else self._state_array("h", h)
        cc = self._check_c(c)
        self._state.zero(s)
        if hh is not None or cc is not None:
            self._state.set(s, hh if hh is not None else np.zeros((self.spec.layers, self.spec.hidden),
                                                                  np.float32), cc)

    def read(self, slot) -> dict:
        """{"h": (layers, hidden)[, "c": ...]} copies of a slot's state."""
        return self._state.get(self._slot(slot))

    def write(self, slot, h, c=None):
        s = self._slot(slot)
        hh, cc = self._state_array("h", h), self._check_c(c)
        if self.spec.has_cell_state and cc is None:
            raise CellError("an LSTM slot needs both h and c")
        self._state.set(s, hh, cc)

    def read_many(self, slots) -> dict:
        """{"h": (N, layers, hidden)[, "c": ...]} copies for many slots (snapshots)."""
        slots = self._slots(slots)
        if slots.size and (slots.min() < 0 or slots.max() >= self.capacity):
            raise CellError(f"slots must be in [0, {self.capacity}), got {slots.min()}..{slots.max()}")
        return self._state.get(slots)

    def write_many(self, slots, h, c=None):
        """Set many slots at once: h (N, layers, hidden)[, c likewise]."""
        slots = self._slots(slots)
        if slots.size and (slots.min() < 0 or slots.max() >= self.capacity):
            raise CellError(f"slots must be in [0, {self.capacity}), got {slots.min()}..{slots.max()}")
        shape = (len(slots), self.spec.layers, self.spec.hidden)
        arrays = {}
        for name, v in (("h", h), ("c", c)):
            if v is None:
                continue
            if name == "c" and not self.spec.has_cell_state:
                raise CellError(f"a {self.spec.cell.upper()} has no cell state: do not pass c")
            a = np.asarray(v, dtype=np.float32)
            if a.shape != shape:
                raise CellError(f"{name} must have shape (N, layers, hidden) = {shape}, got {a.shape}")
            arrays[name] = a
        if self.spec.has_cell_state and "c" not in arrays:
            raise CellError("LSTM slots need both h and c")
        self._state.set(slots, arrays["h"], arrays.get("c"))

    def copy(self, src, dst):
        """Fork: dst gets src's state (a what-if rollout from the same point)."""
        s, d = self._slot(src), self._slot(dst)
        if s != d:
            self._state.copy(s, d)

    def grow(self, new_capacity):
        """Enlarge the slot arrays, keeping every slot's state."""
        new_capacity = int(new_capacity)
        if new_capacity < self.capacity:
            raise CellError(f"grow cannot shrink: capacity {self.capacity} -> {new_capacity}")
        if new_capacity > self.capacity:
            self._state.grow(new_capacity)
            self.capacity = new_capacity

    def __repr__(self):
        s = self.spec
        return (f"Cell({s.cell}, layers={s.layers}, hidden={s.hidden}, input={s.input_kind}:"
                f"{s.input_features}, out={s.output_size}, device={self.device}, "
                f"capacity={self.capacity})")


def load_cell(path: str | os.PathLike, *, device: str = "auto", capacity: int = 1024) -> Cell:
    """Parse the ONNX file, allocate `capacity` slots, compile and warm the kernels."""
    return Cell(load_spec(path), device=device, capacity=capacity)
