"""SessionManager: live streaming sessions, shared by every protocol.

A session is named by (tenant, sequence_id) per model and owns one slot of
the model's Numba cell, which keeps its recurrent state. Semantics follow
Triton's sequence extension:
  start=True   creates the session, or restarts a live one with fresh state
  no start     on an unknown id is refused (INVALID_ARGUMENT, "set start")
  end=True     frees the session after that step
  idle         sessions untouched for `idle_s` are freed by `sweep()`
  capacity     at `max_sessions` live sessions a new start is RESOURCE_EXHAUSTED

Ordering and batching. Bookkeeping (create, restart, end, capacity) happens
when a call arrives, in arrival order, on the event loop. The steps
themselves run in one of two ways:
  quiet  nothing is queued for the model and the previous step arrived more
         than BATCH_WINDOW_S ago: the step runs inline, at once (no future,
         no loop hop: the lowest latency a lone client can get);
  busy   otherwise it queues; the first queued step schedules a flush with
         `loop.call_soon`, so every step that arrives in the same loop
         iteration (other streams) runs in ONE `cell.step` call. No timer.
         Queueing costs a future and a loop hop per step, so it is only kept
         while it pays: if flushes keep running one step each (grpc.aio
         often delivers each stream's message in its own loop iteration),
         arrivals run inline again, and queueing is re-tried every
         PROBE_EVERY_S.
The streaming hot path (`try_plain_step`, and serving/_hotpath.c, its C twin
that the network handlers call first: a plain step of a live session of a
float model) makes the same decision without the general path's objects:
quiet, the single-slot kernel writes y into the session's row; busy, the
step queues as a light `_Plain` (slot, floats, caller), and a flush of
plain steps only is one `cell.step` with array bookkeeping.
A multiplexed message (`step_batch`) is one `cell.step` call by itself.
A flush runs rounds: each round takes at most one item per session, so a
session's steps run in the order they arrived. The cell runs on the event
loop: a step costs ~10 us, far less than a thread hop would.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import numpy as np

from serving.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument,
                            PositionMismatch, ResourceExhausted, Unavailable)
from serving.runtime.inputs import bad_rows, check_steps
from serving.runtime.inputs import bad_row_message as _bad_row_message
from serving.runtime.registry import LoadedModel, Registry

log = logging.getLogger("seqserve.sessions")

# Arrivals closer together than this are treated as concurrent load and
# queued for batching; a client stepping alone (one round trip, >= ~200 us,
# apart) always runs inline.
BATCH_WINDOW_S = float(os.environ.get("SEQSERVE_BATCH_WINDOW_US", "100")) * 1e-6
PROBE_FLUSHES = 64  # flushes judged per probe
PROBE_EVERY_S = 1.0  # how often queueing is re-tried once it did not pay
PAYS_MEAN_BATCH = 1.5  # mean steps per flush that make queueing worth it


def session_key(sequence_id, tenant: str = ""):
    """The dict key of a session: the id alone, or (tenant, id) for a tenant."""
    if sequence_id is None or sequence_id == 0 or sequence_id == "" or isinstance(sequence_id, bool):
        raise InvalidArgument("sequence_id must be a non-zero integer or a non-empty string")
    if not isinstance(sequence_id, (int, str)):
        raise InvalidArgument(f"sequence_id must be an integer or a string, got {type(sequence_id).__name__}")
    return (tenant, sequence_id) if tenant else sequence_id


def _plain_rows(table: dict, sequence_ids, tenant: str, starts, ends, expects, errors):
    """The slots of a packed batch that needs none of step_batch's per-row
    checks, else None: no start, end or expected position, no refused row,
    and every id (int or str, so never a bool) names a live session, each
    once. A key found in the table was checked by session_key when its
    session started. Comprehensions instead of the per-row loop: ~2 us per
    row less on a 100-session message."""
    if expects is not None or any(starts) or any(ends) or errors.count(None) != len(errors):
        return None
    if not set(map(type, sequence_ids)) <= _ID_TYPES:
        return None
    get = table.get
    found = [get(k) for k in sequence_ids] if not tenant else \
        [get((tenant, k)) for k in sequence_ids]
    if None in found or len(set(found)) != len(found):
        return None  # unknown or repeated sessions: the per-row checks name them
    return found


_ID_TYPES = {int, str}


def key_parts(key) -> tuple[str, int | str]:
    """(tenant, sequence_id) of a session key."""
    return key if isinstance(key, tuple) else ("", key)


class _Call:
    """One caller waiting for the results of its items (one or many).

    deadline: time.monotonic() after which the caller has given up (None:
    no deadline); work still queued then is dropped, never run.
    """

    __slots__ = ("future", "left", "results", "deadline", "direct")

    def __init__(self, future, n, deadline=None, direct=False):
        self.future = future
        self.left = n
        self.results = [None] * n
        self.deadline = deadline
        self.direct = direct  # one result, handed to the future itself (a queued _Plain)


class _BatchSizes:
    """observer.batch(model, size) bound to one model; the observer's own bound
    metric when it offers one (metrics.SessionObserver.batch_child)."""

    __slots__ = ("observe",)

    def __init__(self, observer, model: str):
        child = getattr(observer, "batch_child", None)
        self.observe = child(model).observe if child is not None else \
            (lambda size: observer.batch(model, size))


class _Plain:
    """A queued plain step (SessionManager.try_plain_step): slot, F floats, and
    the caller's future, which the flush resolves to (y, position) or the
    step's error. No _Call: awaiting the bare future is one frame less per
    step. A flush that cannot run it in the plain batch makes it a full
    _Item (`_as_item`) whose _Call hands its result to that future."""

    __slots__ = ("slot", "values", "future")

    def __init__(self, slot, values, future):
        self.slot = slot
        self.values = values
        self.future = future


queue_item = _Plain  # what serving._hotpath queues a busy model's plain step as


def _as_item(ms, it: _Plain) -> "_Item":
    return _Item(it.slot, np.array([it.values], np.float32), None, False, False,
                 _Call(it.future, 1, direct=True), 0, key=ms.keys[it.slot])


class _Item:
    """One unit of queued work for one session slot.

    x: steps to run ((1, F) / (1,) go to the batched single-step path);
    fn: instead of steps, a callable fn(model_sessions, slot) run in order;
    expect: the position the caller expects the session at (-1: any);
    start: the request's start flag; created: admission allocated the slot.
    """

    __slots__ = ("slot", "x", "fn", "restart", "free", "call", "index", "expect", "start",
                 "created", "key")

    def __init__(self, slot, x, fn, restart, free, call, index, expect=-1, start=False,
                 created=False, key=None):
        self.slot = slot
        self.x = x
        self.fn = fn
        self.restart = restart
        self.free = free
        self.call = call
        self.index = index
        self.expect = expect
        self.start = start
        self.created = created
        self.key = key


class ModelSessions:
    """The sessions of one model: key -> slot, plus per-slot bookkeeping arrays."""

    def __init__(self, model: LoadedModel, max_sessions: int, tenants=None):
        self.model = model
        self.tenants = tenants  # optional TenantQuota shared by every model
        self.info = model.info
        self.cell = model.require_cell()
        self.max_sessions = max_sessions
        self.table: dict = {}  # key -> slot
        cap = int(self.cell.capacity)
        self.keys: list = [None] * cap  # slot -> key, None when free
        self.free: list[int] = list(range(cap - 1, -1, -1))  # pop() hands out slot 0 first
        # Per-slot bookkeeping kept in arrays, not objects: 100k sessions stay small.
        self.position = np.zeros(cap, np.int64)
        self.last_used = np.zeros(cap, np.float64)
        self.last_y = np.zeros((cap, self.info.output_size), np.float32)
        # Exactly-once: what the last applied step of each slot was asked as
        # (expected position, length, start flag), so an identical retry gets
        # the stored answer (last_y, or chunk_y for chunks) instead of a rerun.
        self.ans_expect = np.full(cap, -1, np.int64)
        self.ans_len = np.zeros(cap, np.int32)
        self.ans_start = np.zeros(cap, np.bool_)
        self.chunk_y: dict[int, np.ndarray] = {}  # slot -> (T, out) of its last chunk
        self.batch_sizes = None  # .observe(size): the batch-size metric (SessionManager.refresh)
        self.pending: list = []  # _Item | _Plain, in arrival order
        self.n_plain = 0  # how many of them are _Plain
        self.scheduled = False
        self.last_arrival = 0.0
        # adaptive batching (see module doc)
        self.batching = True
        self.probe_flushes = 0
        self.probe_steps = 0
        self.next_probe = 0.0
        self.tokens = self.info.input_kind == "tokens"

    @property
    def capacity(self) -> int:
        return len(self.keys)

    def _grow(self) -> None:
        # grow by an eighth (at least 1024 slots): doubling would overshoot
        # large session counts by up to 2x in memory; copies stay amortised O(1).
        old = self.capacity
        new = old + max(1024, old // 8)
        self.cell.grow(new)
        new = int(self.cell.capacity)
        self.keys.extend([None] * (new - old))
        self.free[:0] = range(new - 1, old - 1, -1)  # new slots at the bottom of the stack
        self.position = np.concatenate([self.position, np.zeros(new - old, np.int64)])
        self.last_used = np.concatenate([self.last_used, np.zeros(new - old, np.float64)])
        self.last_y = np.concatenate(
            [self.last_y, np.zeros((new - old, self.info.output_size), np.float32)])
        self.ans_expect = np.concatenate([self.ans_expect, np.full(new - old, -1, np.int64)])
        self.ans_len = np.concatenate([self.ans_len, np.zeros(new - old, np.int32)])
        self.ans_start = np.concatenate([self.ans_start, np.zeros(new - old, np.bool_)])
        log.info("model %s: session capacity %d -> %d", self.info.name, old, new)

    def allocate(self, key, enforce_quota: bool = True) -> int:
        if len(self.table) >= self.max_sessions:
            raise ResourceExhausted(
                f"model {self.info.name!r} has {len(self.table)} live sessions, the limit "
                f"(--max-sessions); end sessions or wait for idle ones to expire")
        if self.tenants is not None:
            self.tenants.take(key, enforce_quota)  # ResourceExhausted over the tenant's quota
        if not self.free:
            self._grow()
        slot = self.free.pop()
        # A fresh slot is reset here, not at run time, so a session whose
        # first step is dropped never sees a previous occupant's state.
        self.cell.reset(slot)
        self.position[slot] = 0
        self.last_y[slot] = 0.0
        self.ans_expect[slot] = -1
        self.table[key] = slot
        self.keys[slot] = key
        return slot

    def release(self, slot: int) -> None:
        if self.tenants is not None and self.keys[slot] is not None:
            self.tenants.give(self.keys[slot])
        self.keys[slot] = None
        self.chunk_y.pop(slot, None)
        self.free.append(slot)

    def replay(self, slot: int, expect: int, steps: int, start: bool):
        """Exactly-once check of a step that expects the session at `expect`.

        -> None: apply it; (y, position): it is a retry of the step applied
        last, answered from storage; PositionMismatch: the session is elsewhere.
        """
        if (self.ans_expect[slot] == expect and self.ans_len[slot] == steps
                and bool(self.ans_start[slot]) == bool(start)):
            y = self.chunk_y.get(slot) if steps > 1 else self.last_y[slot][None].copy()
            if y is not None:
                return y, int(self.position[slot])
        pos = int(self.position[slot])
        if pos != expect:
            return position_mismatch(self.keys[slot], pos, expect)
        return None

    def answered(self, slot: int, expect: int, steps: int, start: bool, y=None) -> None:
        """Remember how the step just applied to `slot` was asked (see replay)."""
        self.ans_expect[slot] = expect
        self.ans_len[slot] = steps
        self.ans_start[slot] = start
        if steps > 1 and expect >= 0:
            self.chunk_y[slot] = y
        elif self.chunk_y:
            self.chunk_y.pop(slot, None)

    def live_slots(self) -> np.ndarray:
        return np.fromiter(self.table.values(), np.int64, len(self.table))


def position_mismatch(key, position: int, expect: int) -> PositionMismatch:
    sid = key_parts(key)[1]
    return PositionMismatch(
        f"session {sid!r} is at position {position}, not {expect}: a step was lost or applied "
        f"already; resend from step {position} (the position is also in trailing metadata "
        f"'seqserve-position')", position)


class TenantQuota:
    """Live sessions per tenant, over every model; at `limit` a new start is refused."""

    def __init__(self, limit: int):
        self.limit = limit
        self.live: dict[str, int] = {}

    def take(self, key, enforce: bool = True) -> None:
        tenant = key_parts(key)[0]
        n = self.live.get(tenant, 0)
        if enforce and self.limit and n >= self.limit:
            raise ResourceExhausted(
                f"tenant has {n} live sessions, its quota (--max-sessions-per-tenant); end "
                f"sessions or wait for idle ones to expire")
        self.live[tenant] = n + 1

    def give(self, key) -> None:
        tenant = key_parts(key)[0]
        n = self.live.get(tenant, 0) - 1
        if n > 0:
            self.live[tenant] = n
        else:
            self.live.pop(tenant, None)


class SessionManager:
    """All models' sessions; every protocol's stateful calls go through here."""

    def __init__(self, registry: Registry, *, max_sessions: int = 200_000,
                 idle_s: float = 300.0, max_steps: int = 4096, observer=None,
                 max_per_tenant: int = 0, max_queue: int = 10_000):
        self.registry = registry
        self.tenants = TenantQuota(max_per_tenant)
        self.max_queue = max_queue  # queued steps per model before new work is refused
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self.max_steps = max_steps
        self.observer = observer  # optional: .batch(model, size), .evicted(model, n)
        self.closing = False
        self.models: dict[str, ModelSessions] = {}
        self.refresh()

    def refresh(self) -> None:
        """Pick up the registry's models (call after it has loaded)."""
        for m in self.registry:
            if m.cell is not None and m.name not in self.models:
                ms = self.models[m.name] = ModelSessions(m, self.max_sessions, self.tenants)
                if self.observer is not None:  # the model's batch-size metric, bound once
                    ms.batch_sizes = _BatchSizes(self.observer, m.name)

    # ---- lookup -------------------------------------------------------------

    def model_sessions(self, model: str, version: int | None = None) -> ModelSessions:
        m = self.registry.get(model, version)  # NotFound for unknown model/version
        ms = self.models.get(m.name)
        if ms is None:
            m.require_cell()  # raises FailedPrecondition with the reason
            raise FailedPrecondition(f"model {model!r} has no streaming cell")
        return ms

    def live(self, model: str) -> int:
        ms = self.models.get(model)
        return len(ms.table) if ms else 0

    def position(self, model: str, sequence_id, tenant: str = "") -> int:
        ms = self.model_sessions(model)
        slot = self._slot(ms, session_key(sequence_id, tenant), sequence_id)
        return int(ms.position[slot])

    def _slot(self, ms: ModelSessions, key, sequence_id) -> int:
        slot = ms.table.get(key)
        if slot is None:
            raise InvalidArgument(
                f"unknown session {sequence_id!r} for model {ms.info.name!r}: set start=true on "
                f"the first step of a session (it may also have ended or expired)")
        return slot

    # ---- admission (runs at arrival, in arrival order) ------------------------

    def _check_room(self, ms: ModelSessions, call=None) -> None:
        if self.closing:
            raise Unavailable("server is shutting down; retry on another replica or after restart")
        if len(ms.pending) >= self.max_queue:
            raise ResourceExhausted(
                f"model {ms.info.name!r} has {len(ms.pending)} steps queued, the limit "
                f"(--max-queue); retry with backoff")
        if call is not None and call.deadline is not None and time.monotonic() > call.deadline:
            raise DeadlineExceeded("the caller's deadline passed before the step could run")

    def _admit(self, ms: ModelSessions, sequence_id, x, start, end, tenant, call, index,
               checked=False, expect=-1):
        self._check_room(ms, call)
        if not checked:
            x = check_steps(ms.info, x, self.max_steps)
        key = session_key(sequence_id, tenant)
        slot = ms.table.get(key)
        restart = created = False
        if start:
            if slot is None:
                if expect > 0:  # nothing to create at a later position: resynchronise from 0
                    raise position_mismatch(key, 0, expect)
                slot = ms.allocate(key)
                created = True
            else:
                restart = True
        elif slot is None:
            self._slot(ms, key, sequence_id)  # raises the "set start" error
        if end:
            del ms.table[key]  # the slot itself is released after this step runs
        now = time.monotonic()
        ms.last_used[slot] = now
        item = _Item(slot, x, None, restart, end, call, index, expect, start, created, key)
        if not ms.batching and now >= ms.next_probe:
            ms.batching = True  # probe again: load may have changed
        quiet = not ms.pending and (not ms.batching or now - ms.last_arrival > BATCH_WINDOW_S)
        ms.last_arrival = now
        if quiet and call.future is None:  # inline: see the module doc
            if item.expect < 0 and not restart and x.shape[0] == 1:
                self._run_singles(ms, (item,))  # the lone plain step: nothing else to decide
            else:
                self._run_round(ms, [item])
        else:
            self._enqueue(ms, item)

    def _enqueue(self, ms: ModelSessions, item: _Item) -> None:
        ms.pending.append(item)
        if not ms.scheduled:
            ms.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, ms)

    # ---- public API -------------------------------------------------------------

    async def step(self, model: str, version: int | None, sequence_id, x: np.ndarray, *,
                   start: bool = False, end: bool = False, tenant: str = "") -> np.ndarray:
        """One session's next step(s): x (T, F) float32 | (T,) int64 -> y (T, out)."""
        return (await self.step_with_position(model, version, sequence_id, x,
                                              start=start, end=end, tenant=tenant))[0]

    async def step_with_position(self, model, version, sequence_id, x, *, start=False,
                                 end=False, tenant="", checked=False, expect=None,
                                 deadline=None) -> tuple[np.ndarray, int]:
        """Like step(), also returning the session's position after the step.

        checked=True: the caller guarantees x is already (1, F) float32 with
        finite values of this model (a protocol's fast path); nothing is re-checked.
        expect: the position (steps taken) the caller believes the session is
        at; a retry of the step applied last returns its stored answer, any
        other mismatch raises PositionMismatch (ABORTED) with the real position.
        deadline: time.monotonic() after which the caller has gone.
        """
        ms = self.model_sessions(model, version)
        # Try inline first: a call without a future runs at once when quiet.
        call = _Call(None, 1, deadline)
        self._admit(ms, sequence_id, x, start, end, tenant, call, 0, checked,
                    -1 if expect is None else int(expect))
        if call.left:  # it was queued: wait for the flush
            call.future = asyncio.get_running_loop().create_future()
            await call.future
        res = call.results[0]
        if isinstance(res, BaseException):
            raise res
        return res

    def try_plain_step(self, ms: ModelSessions, sequence_id, values, tenant: str = ""):
        """The hot path of streaming: one plain step of a live session.

        Plain: no start, end, expected position or deadline; values: the F
        finite floats of one float-input step. The same decisions as
        `_admit`, without the objects the general path builds:
          quiet  the step runs now and the cell writes y straight into the
                 session's last-output row; returns (y (1, out) - a view of
                 that row: read it before the session's next step -, position);
          busy   the step joins the model's queue as a light `_Plain` item
                 (its input stays a list until the flush packs every queued
                 step into one array); returns its future:
                 awaiting it gives (y, position) or raises the step's error.
        None when the step is not plain after all (unknown session, a full
        queue, a cell this path does not drive, shutting down): then the
        caller takes the general path, which also reports every error.
        ms: the model's sessions (`self.models[name]`).

        serving/_hotpath.c makes these same decisions in C for the network
        handlers (the Python path here is its fallback and reference):
        change one, change the other; tests/serving/test_hotpath.py
        compares them.
        """
        if self.closing:
            return None
        slot = ms.table.get((tenant, sequence_id) if tenant else sequence_id)
        if slot is None:
            return None
        now = time.monotonic()
        pending = ms.pending
        if not ms.batching and now >= ms.next_probe:
            ms.batching = True  # probe again: load may have changed
        if not pending and (not ms.batching or now - ms.last_arrival > BATCH_WINDOW_S):
            try:
                if not ms.cell.step_into(values, slot, ms.last_y):
                    return None
            except Exception:
                log.exception("cell step failed for model %s", ms.info.name)
                raise
            ms.last_arrival = now
            ms.last_used[slot] = now
            return ms.last_y[slot: slot + 1], self._count_one(ms, slot)
        if len(pending) >= self.max_queue:
            return None  # the general path refuses it with the limit named
        ms.last_arrival = now
        ms.last_used[slot] = now
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pending.append(_Plain(slot, values, future))
        ms.n_plain += 1
        if not ms.scheduled:
            ms.scheduled = True
            loop.call_soon(self._flush, ms)
        return future

    async def step_many(self, requests, deadline=None) -> list:
        """Steps for many sessions at once (a multiplexed stream message).

        requests: iterable of (model, version, sequence_id, x, start, end, tenant[, expect]).
        Returns, in order, (y, position) per request or the ServingError that
        refused it: one bad request does not affect the others.
        """
        requests = list(requests)
        if len(requests) > self.max_steps:
            raise InvalidArgument(f"{len(requests)} steps in one message; at most "
                                  f"{self.max_steps} (--max-steps-per-request)")
        call = _Call(asyncio.get_running_loop().create_future(), len(requests), deadline)
        admitted = 0
        for i, (model, version, sequence_id, x, start, end, tenant, *more) in enumerate(requests):
            try:
                ms = self.model_sessions(model, version)
                expect = more[0] if more and more[0] is not None else -1
                self._admit(ms, sequence_id, x, start, end, tenant, call, i, False, expect)
                admitted += 1
            except Exception as exc:  # noqa: BLE001 - reported per request
                call.results[i] = exc
        # Refused requests never run: count only the admitted ones (safe now,
        # since queued items run on a later loop iteration, not before this).
        call.left = admitted
        if admitted:
            await call.future
        return call.results

    async def step_batch(self, model: str, version: int | None, sequence_ids: list,
                         x: np.ndarray, starts: list, ends: list, tenant: str = "",
                         expects=None, deadline=None):
        """One step for each of B distinct sessions of one model, as one cell call.

        x: (B, F) float32 | (B,) int64. Returns (y (B, out), positions (B,),
        errors): errors[i] is the ServingError that refused row i (its y row
        is zeros) or None. One bad row does not affect the others.
        expects: None, or per row the position the session is expected at
        (-1: any); see step_with_position. A refused row's position is its
        session's actual position when the refusal was a position mismatch.
        """
        ms = self.model_sessions(model, version)
        self._check_room(ms, _Call(None, 0, deadline))
        B = len(sequence_ids)
        if B > self.max_steps:
            raise InvalidArgument(
                f"{B} sessions in one message; at most {self.max_steps} (--max-steps-per-request)")
        if expects is not None and len(expects) != B:
            raise InvalidArgument(f"batch expected_positions need one entry per session ({B})")
        errors: list = [None] * B
        for i in bad_rows(ms.info, x, B):
            errors[i] = InvalidArgument(_bad_row_message(ms.info, x[i]))
        positions = np.zeros(B, np.int64)
        y = np.zeros((B, ms.info.output_size), np.float32)
        restarts, frees, seen, created = set(), set(), set(), set()
        now = time.monotonic()
        table = ms.table
        found = _plain_rows(table, sequence_ids, tenant, starts, ends, expects, errors)
        if found is not None:  # the common message: every session live, no flags, no errors
            slots = np.array(found, np.int64)
            sequence_ids = ()  # nothing left for the per-row checks below
        else:
            slots = np.zeros(B, np.int64)
        for i, sid in enumerate(sequence_ids):
            if errors[i] is not None:
                continue
            try:
                key = session_key(sid, tenant)
                if key in seen:
                    raise InvalidArgument(
                        f"session {sid!r} appears twice in one message: send several steps of one "
                        f"session as a chunk (x of shape (T, F)) or in separate messages")
                slot = table.get(key)
                e = -1 if expects is None else int(expects[i])
                if starts[i]:
                    if slot is None:
                        if e > 0:
                            raise position_mismatch(key, 0, e)
                        slot = ms.allocate(key)
                        created.add(slot)
                    else:
                        restarts.add(slot)
                elif slot is None:
                    self._slot(ms, key, sid)
                if e >= 0 and slot not in created:
                    res = ms.replay(slot, e, 1, starts[i])
                    if isinstance(res, BaseException):
                        restarts.discard(slot)
                        positions[i] = res.position
                        raise res
                    if res is not None:  # a retry: the stored answer, nothing runs
                        restarts.discard(slot)
                        y[i] = res[0][0]
                        positions[i] = res[1]
                        if ends[i]:
                            del table[key]
                            ms.release(slot)
                        seen.add(key)
                        errors[i] = False  # answered (not an error, not to be run)
                        continue
            except Exception as exc:  # noqa: BLE001 - reported for this row only
                errors[i] = exc
                continue
            seen.add(key)
            if ends[i]:
                del table[key]
                frees.add(slot)
            slots[i] = slot
        if found is not None:
            ok = range(B)
        else:
            ok = [i for i in range(B) if errors[i] is None]
            for i in range(B):
                if errors[i] is False:
                    errors[i] = None
        if not ok:
            return y, positions, errors
        every = len(ok) == B
        ms.last_used[slots if every else slots[ok]] = now
        ms.last_arrival = now
        if ms.pending:  # queued work first, in order: go through the queue row by row
            # bookkeeping (start/end) is done above; only the steps remain
            call = _Call(asyncio.get_running_loop().create_future(), len(ok), deadline)
            for j, i in enumerate(ok):
                slot = int(slots[i])
                e = -1 if expects is None else int(expects[i])
                self._enqueue(ms, _Item(slot, x[i:i + 1], None, slot in restarts, slot in frees,
                                        call, j, e, bool(starts[i]), slot in created,
                                        ms.keys[slot]))
            await call.future
            for j, i in enumerate(ok):
                res = call.results[j]
                if isinstance(res, BaseException):
                    errors[i] = res
                    positions[i] = getattr(res, "position", 0)
                else:
                    y[i] = res[0][0]
                    positions[i] = res[1]
            return y, positions, errors
        # nothing queued: run the whole message now, one cell call
        sel = slots if every else slots[ok]
        for slot in restarts:
            ms.cell.reset(slot)
            ms.position[slot] = 0
        out = ms.cell.step(x if every else x[ok], sel)  # (n, out)
        if expects is None:
            self._count_many(ms, sel, out)
        else:
            self._count_many(ms, sel, out, np.asarray(expects, np.int64)[ok],
                             np.asarray(starts, np.bool_)[ok])
        for slot in frees:
            ms.release(slot)
        if every:
            return out, ms.position[sel], errors
        y[ok] = out
        positions[ok] = ms.position[sel]
        return y, positions, errors

    async def end(self, model: str, version: int | None, sequence_id, tenant: str = "") -> int:
        """Free a session after its queued steps; returns the steps it had taken."""
        ms = self.model_sessions(model, version)
        if len(ms.pending) >= self.max_queue:
            self._check_room(ms)
        key = session_key(sequence_id, tenant)
        slot = self._slot(ms, key, sequence_id)
        del ms.table[key]
        return await self._run_in_order(ms, slot, lambda ms_, s: int(ms_.position[s]), free=True)

    async def rollout(self, model: str, version: int | None, sequence_id, steps: int,
                      x: np.ndarray | None = None, *, commit: bool = False, tenant: str = "",
                      temperature: float = 0.0, top_k: int = 0,
                      seed: int = 0) -> tuple[np.ndarray, int, list[int]]:
        """Closed loop: `steps` steps from the session's state, feeding outputs back.

        Returns (y (steps, out), position, tokens). The session is left
        untouched unless commit=True. First input: x (one step) or the last
        output. A language model feeds back a token chosen from each step's
        logits: the argmax (temperature 0), or a sample from
        softmax(logits / temperature), among the top_k most probable if
        top_k > 0, repeatable with a seed; `tokens` are the ids it read
        (empty for other models).
        """
        if self.closing:
            raise Unavailable("server is shutting down")
        ms = self.model_sessions(model, version)
        info = ms.info
        lm = info.output_kind == "lm"
        if not lm and not (info.output_kind == "regression" and info.output_size == info.input_features):
            raise FailedPrecondition(
                f"model {info.name!r} ({info.output_kind}, {info.output_size} outputs for "
                f"{info.input_features} input features) cannot feed its output back as input")
        if not 0 < steps <= self.max_steps:
            raise InvalidArgument(f"rollout steps must be in 1..{self.max_steps}, got {steps}")
        choose = _token_chooser(info, temperature, top_k, seed) if lm else None
        if not lm and (temperature or top_k or seed):
            raise InvalidArgument(f"temperature, top_k and seed choose tokens of a language model; "
                                  f"{info.name!r} is a {info.output_kind} model")
        first = None
        if x is not None and np.asarray(x).size:
            first = check_steps(info, np.asarray(x), self.max_steps)
            if first.shape[0] != 1:
                raise InvalidArgument(f"rollout x must be one step, got {first.shape[0]}")
        key = session_key(sequence_id, tenant)
        slot = self._slot(ms, key, sequence_id)
        ms.last_used[slot] = time.monotonic()

        def run(ms_, src):
            return _closed_loop(ms_, src, steps, first, commit, choose)

        return await self._run_in_order(ms, slot, run)

    async def read(self, model: str, sequence_id, tenant: str = "") -> dict:
        """A copy of a session's state: {"h", "c"?, "position", "last_y"}."""
        ms = self.model_sessions(model)
        slot = self._slot(ms, session_key(sequence_id, tenant), sequence_id)

        def run(ms_, s):
            out = {k: np.array(v) for k, v in ms_.cell.read(s).items() if v is not None}
            out["position"] = int(ms_.position[s])
            out["last_y"] = ms_.last_y[s].copy()
            return out

        return await self._run_in_order(ms, slot, run)

    async def _run_in_order(self, ms, slot, fn, free=False):
        call = _Call(asyncio.get_running_loop().create_future(), 1)
        self._enqueue(ms, _Item(slot, None, fn, False, free, call, 0))
        await call.future
        res = call.results[0]
        if isinstance(res, BaseException):
            raise res
        return res

    # ---- execution ----------------------------------------------------------------

    def _flush(self, ms: ModelSessions) -> None:
        ms.scheduled = False
        items, ms.pending = ms.pending, []
        plain, ms.n_plain = ms.n_plain, 0
        ms.probe_flushes += 1
        ms.probe_steps += len(items)
        if ms.probe_flushes >= PROBE_FLUSHES:
            ms.batching = ms.probe_steps >= PAYS_MEAN_BATCH * ms.probe_flushes
            if not ms.batching:
                ms.next_probe = time.monotonic() + PROBE_EVERY_S
            ms.probe_flushes = ms.probe_steps = 0
        if plain:
            if plain == len(items) and self._run_plain(ms, items):
                return
            items = [_as_item(ms, it) if it.__class__ is _Plain else it for it in items]
        while items:
            seen, now, later = set(), [], []
            for it in items:
                if it.slot in seen:
                    later.append(it)
                else:
                    seen.add(it.slot)
                    now.append(it)
            self._run_round(ms, now)
            items = later

    def _run_round(self, ms: ModelSessions, items: list[_Item]) -> None:
        singles = []
        for it in items:
            call = it.call
            fut = call.future
            if fut is not None and fut.done():  # caller gone (cancelled): drop before it runs
                self._undo(ms, it)
                continue
            if call.deadline is not None and time.monotonic() > call.deadline:
                self._undo(ms, it)
                self._done(ms, it, DeadlineExceeded(
                    "the caller's deadline passed while the step was queued; it was not applied"))
                continue
            if it.expect >= 0 and not it.created:
                res = ms.replay(it.slot, it.expect, 1 if it.x is None else it.x.shape[0], it.start)
                if res is not None:  # a stored answer, or a mismatch: nothing runs
                    if isinstance(res, BaseException):
                        self._undo(ms, it)
                    self._done(ms, it, res)
                    continue
            if it.restart:
                ms.cell.reset(it.slot)
                ms.position[it.slot] = 0
                ms.last_y[it.slot] = 0.0
            if it.fn is None and it.x.shape[0] == 1:
                singles.append(it)
                continue
            try:
                if it.fn is not None:
                    res = it.fn(ms, it.slot)
                else:
                    y = ms.cell.step_chunk(it.x[None], np.array([it.slot], np.int64))[0]  # (T, out)
                    ms.position[it.slot] += it.x.shape[0]
                    ms.last_y[it.slot] = y[-1]
                    ms.answered(it.slot, it.expect, it.x.shape[0], it.start, y)
                    res = (y, int(ms.position[it.slot]))
            except Exception as exc:  # noqa: BLE001 - goes to that caller only
                res = exc
            self._done(ms, it, res)
        if singles:
            self._run_singles(ms, singles)

    def _run_singles(self, ms: ModelSessions, items: list[_Item]) -> None:
        n = len(items)
        if n == 1:  # the quiet path: scalar bookkeeping, no fancy indexing
            it = items[0]
            try:
                res = self._apply_one(ms, it.slot, it.x, it.expect, it.start)
            except Exception as exc:  # noqa: BLE001
                log.exception("cell step failed for model %s", ms.info.name)
                res = exc
            self._done(ms, it, res)
            return
        else:
            slots = np.fromiter((it.slot for it in items), np.int64, n)
            x = np.concatenate([it.x for it in items])  # (B, F) | (B,)
        try:
            y = ms.cell.step(x, slots)  # (B, out)
        except Exception as exc:  # noqa: BLE001
            log.exception("cell step failed for model %s", ms.info.name)
            for it in items:
                self._done(ms, it, exc)
            return
        self._count_many(ms, slots, y, np.fromiter((it.expect for it in items), np.int64, n),
                         np.fromiter((it.start for it in items), np.bool_, n))
        pos = ms.position
        for i, it in enumerate(items):
            self._done(ms, it, (y[i:i + 1], int(pos[it.slot])))

    def _run_plain(self, ms: ModelSessions, items: list) -> bool:
        """A flush of nothing but `_Plain` steps: one cell.step call, array bookkeeping.

        False (nothing done) when two items step the same session: the
        general rounds then run them in order.
        """
        live = [it for it in items if not it.future.done()]  # cancelled callers: dropped
        n = len(live)
        if not n:
            return True
        slots = [it.slot for it in live]
        if n > 1 and len(set(slots)) != n:
            return False
        sl = np.array(slots, np.int64)
        try:
            y = ms.cell.step(np.array([it.values for it in live], np.float32), sl)  # (n, out)
        except Exception as exc:  # noqa: BLE001 - every caller of this flush gets it
            log.exception("cell step failed for model %s", ms.info.name)
            for it in live:
                it.future.set_exception(exc)
            return True
        self._count_many(ms, sl, y)
        # each caller's (1, out) row: views made by one C-level iteration
        for it, row, pos in zip(live, list(y[:, None]), ms.position[sl].tolist()):
            it.future.set_result((row, pos))
        return True

    def _apply_one(self, ms: ModelSessions, slot: int, x, expect: int = -1, start: bool = False):
        """One step of one slot, run now, with its bookkeeping -> (y (1, out), position).

        y is a fresh array (a queued caller may read it after the session's
        next step has run); try_plain_step, whose caller reads y at once,
        lets the cell write into last_y instead.
        """
        y = ms.cell.step_one(x, slot)  # (1, out)
        ms.last_y[slot] = y[0]
        return y, self._count_one(ms, slot, expect, start)

    @staticmethod
    def _count_many(ms: ModelSessions, slots: np.ndarray, y, expects=None, starts=None) -> None:
        """Bookkeeping of one applied step for each of `slots` (distinct), as
        _count_one: outputs, positions and how each step was asked (expects,
        starts: per slot; None: plain steps, asked at no position)."""
        ms.position[slots] += 1
        ms.last_y[slots] = y
        if expects is None:
            ms.ans_expect[slots] = -1
        else:
            ms.ans_expect[slots] = expects
            ms.ans_len[slots] = 1
            ms.ans_start[slots] = starts
        if ms.batch_sizes is not None:
            ms.batch_sizes.observe(len(slots))

    def _count_one(self, ms: ModelSessions, slot: int, expect: int = -1, start: bool = False) -> int:
        """Bookkeeping of one applied step (last_y already set) -> the new position."""
        pos = ms.position.item(slot) + 1
        ms.position[slot] = pos
        ms.ans_expect[slot] = expect
        if expect >= 0:
            ms.ans_len[slot] = 1
            ms.ans_start[slot] = start
        if ms.batch_sizes is not None:
            ms.batch_sizes.observe(1)
        return pos

    @staticmethod
    def _undo(ms: ModelSessions, it: _Item) -> None:
        """Admission bookkeeping of an item that will not run: nothing half-applied.

        An end that did not run leaves the session live; a session this item
        created is freed again (it never took its first step).
        """
        key = it.key
        if it.created:
            if key is not None and ms.table.get(key) == it.slot:
                del ms.table[key]
            if ms.keys[it.slot] is not None:
                ms.release(it.slot)
        elif it.free:
            if key is not None and key not in ms.table and ms.keys[it.slot] == key:
                ms.table[key] = it.slot
            else:
                ms.release(it.slot)
        it.free = False

    @staticmethod
    def _done(ms: ModelSessions, it: _Item, res) -> None:
        if it.free:
            ms.release(it.slot)
        call = it.call
        call.results[it.index] = res
        call.left -= 1
        if call.left <= 0 and call.future is not None and not call.future.done():
            if not call.direct:
                call.future.set_result(None)
            elif isinstance(res, BaseException):
                call.future.set_exception(res)
            else:
                call.future.set_result(res)

    # ---- housekeeping ---------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Free sessions idle for longer than idle_s; returns how many."""
        now = time.monotonic() if now is None else now
        cutoff = now - self.idle_s
        total = 0
        for ms in self.models.values():
            if not ms.table:
                continue
            slots = ms.live_slots()
            stale = slots[ms.last_used[slots] < cutoff]
            for slot in stale.tolist():
                key = ms.keys[slot]
                if ms.table.get(key) == slot:
                    del ms.table[key]
                    ms.release(slot)
            if len(stale):
                total += len(stale)
                log.info("model %s: %d idle sessions expired", ms.info.name, len(stale))
                if self.observer is not None:
                    self.observer.evicted(ms.info.name, len(stale))
        return total

    def close(self) -> None:
        """Refuse new work from now on (UNAVAILABLE)."""
        self.closing = True

    async def drain(self) -> None:
        """Wait until every queued step has run."""
        while any(ms.pending or ms.scheduled for ms in self.models.values()):
            await asyncio.sleep(0)


def _token_chooser(info, temperature: float, top_k: int, seed: int):
    """fn(logits (V,)) -> next token id, for a language model's closed loop."""
    if not (np.isfinite(temperature) and temperature >= 0):
        raise InvalidArgument(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0: every token), got {top_k}")
    if temperature == 0:
        if top_k or seed:
            raise InvalidArgument("top_k and seed shape sampling: set temperature > 0 "
                                  "(temperature 0 is greedy)")
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed or None)
    pad = 0 if info.vocab and info.vocab[0] == "<pad>" else None

    def sample(logits):
        z = logits.astype(np.float64) / temperature
        if pad is not None:
            z[pad] = -np.inf  # padding is never a word
        if 0 < top_k < z.size:
            z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
        p = np.exp(z - z.max())
        return int(rng.choice(p.size, p=p / p.sum()))
    return sample


def _closed_loop(ms: ModelSessions, src: int, steps: int, first, commit: bool, choose):
    """Run `steps` steps on a scratch slot copied from `src`; see rollout().

    choose: a language model's token chooser (None: feed the output back as is).
    """
    cell = ms.cell
    if first is None:
        if ms.position[src] == 0:
            raise FailedPrecondition("the session has taken no step yet: send x, the first input")
        prev = ms.last_y[src][None]  # (1, out)
        x = np.array([choose(prev[0])], np.int64) if choose else prev.copy()
    else:
        x = first
    if not ms.free:
        ms._grow()
    tmp = ms.free.pop()
    tokens = []
    try:
        cell.copy(src, tmp)
        slots = np.array([tmp], np.int64)
        out = np.empty((steps, ms.info.output_size), np.float32)
        for t in range(steps):
            if choose:
                tokens.append(int(x[0]))
            y = cell.step(x, slots)  # (1, out)
            out[t] = y[0]
            x = np.array([choose(y[0])], np.int64) if choose else y
        if commit:
            cell.copy(tmp, src)
            ms.position[src] += steps
            ms.last_y[src] = out[-1]
            ms.ans_expect[src] = -1
    finally:
        ms.free.append(tmp)
    return out, int(ms.position[src]), tokens
