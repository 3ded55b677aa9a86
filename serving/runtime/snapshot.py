"""Session state to disk and back, so sessions survive a restart.

One file per model, STATE_DIR/NAME.npz (no pickle), written to a temporary
name, fsynced and renamed over the old one: a crash mid-write leaves the
previous snapshot whole. The file records which model it fits (content
hash, cell, layers, hidden, sizes); on restore a file that does not fit the
loaded model is refused with a log line and moved to STATE_DIR/rejected/,
never applied.

Periodic snapshots (--snapshot-s) bound what a crash (kill -9) loses: the
steps taken since the last one. A clean stop (SIGTERM/SIGINT) loses nothing.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np

from serving.runtime.sessions import ModelSessions, SessionManager, key_parts

log = logging.getLogger("seqserve.snapshot")

FORMAT = 1


def _fits(ms: ModelSessions) -> dict:
    """What a snapshot must match to be applied to this model."""
    i = ms.info
    return {"model": i.name, "content_hash": i.content_hash, "cell": i.cell, "layers": i.layers,
            "hidden": i.hidden, "input_kind": i.input_kind, "input_features": i.input_features,
            "output_size": i.output_size}


def _read_states(ms: ModelSessions, slots: np.ndarray) -> dict[str, np.ndarray]:
    """{"h": (N, layers, hidden), "c"?: ...} of the given slots."""
    cell = ms.cell
    if hasattr(cell, "read_many"):
        return cell.read_many(slots)
    names = ms.info.state_names
    out = {n: np.empty((len(slots), ms.info.layers, ms.info.hidden), np.float32) for n in names}
    for i, slot in enumerate(slots.tolist()):
        state = cell.read(slot)
        for n in names:
            out[n][i] = state[n]
    return out


def _write_states(ms: ModelSessions, slots: list[int], states: dict[str, np.ndarray]) -> None:
    cell = ms.cell
    if hasattr(cell, "write_many"):
        cell.write_many(np.asarray(slots, np.int64), states["h"], states.get("c"))
        return
    c = states.get("c")
    for i, slot in enumerate(slots):
        cell.write(slot, states["h"][i], None if c is None else c[i])


def write_model(ms: ModelSessions, state_dir: Path) -> Path:
    """Write every live session of one model atomically; returns the file."""
    keys = list(ms.table.keys())
    slots = np.fromiter((ms.table[k] for k in keys), np.int64, len(keys))
    arrays = _read_states(ms, slots)
    arrays["position"] = ms.position[slots]
    arrays["last_y"] = ms.last_y[slots]
    meta = dict(_fits(ms), format=FORMAT, version=ms.info.version, written_at=time.time(),
                sessions=len(keys))
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["keys"] = np.array(json.dumps([list(key_parts(k)) for k in keys]))
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"{ms.info.name}.npz"
    tmp = state_dir / f".{ms.info.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_all(sessions: SessionManager, state_dir: str | Path) -> int:
    """Snapshot every model's sessions; returns the number of sessions written.

    Runs on the event loop, between flushes, so no step is half applied.
    """
    state_dir = Path(state_dir)
    total = 0
    for ms in sessions.models.values():
        write_model(ms, state_dir)
        total += len(ms.table)
    return total


def _reject(path: Path, why: str) -> None:
    aside = path.parent / "rejected"
    aside.mkdir(exist_ok=True)
    dest = aside / f"{path.stem}.{int(time.time())}.npz"
    os.replace(path, dest)
    log.error("snapshot %s refused: %s; kept aside as %s", path, why, dest)


def restore_all(sessions: SessionManager, state_dir: str | Path) -> int:
    """Restore every snapshot that fits its loaded model; returns sessions restored."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return 0
    total = 0
    for path in sorted(state_dir.glob("*.npz")):
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads(str(arrays.pop("meta")))
            keys = json.loads(str(arrays.pop("keys")))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is set aside
            _reject(path, f"unreadable ({type(exc).__name__}: {exc})")
            continue
        ms = sessions.models.get(meta.get("model", path.stem))
        if ms is None:
            _reject(path, f"model {meta.get('model')!r} is not served (or cannot stream)")
            continue
        want = _fits(ms)
        diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if meta.get("format") != FORMAT or diff:
            detail = ", ".join(f"{k}: snapshot {a!r} vs loaded {b!r}" for k, (a, b) in diff.items())
            _reject(path, f"does not fit the loaded model ({detail or 'format'})")
            continue
        n = len(keys)
        if len(keys) > ms.max_sessions - len(ms.table):
            _reject(path, f"{n} sessions exceed --max-sessions {ms.max_sessions}")
            continue
        slots = []
        for tenant, sid in keys:
            key = (tenant, sid) if tenant else sid
            slots.append(ms.allocate(key, enforce_quota=False))  # restored, not new
        _write_states(ms, slots, arrays)
        idx = np.asarray(slots, np.int64)
        ms.position[idx] = arrays["position"]
        ms.last_y[idx] = arrays["last_y"]
        ms.last_used[idx] = time.monotonic()  # idle clocks restart: downtime is not idleness
        total += n
        log.info("restored %d sessions of model %s from %s", n, ms.info.name, path)
    return total
