"""Input checks shared by Predict, Step and Rollout.

Every check raises InvalidArgument with a message naming the problem, so a
bad request is refused before it touches any runtime or session.
"""
from __future__ import annotations

import numpy as np

from seqserve.artifact import ModelInfo
from serving.errors import InvalidArgument


def _dtype_for(info: ModelInfo, x: np.ndarray) -> np.ndarray:
    if info.input_kind == "tokens":
        if x.dtype == np.int64:
            return x
        if x.dtype.kind in "iu":
            return x.astype(np.int64)
        raise InvalidArgument(
            f"model {info.name!r} takes int64 token ids, got dtype {x.dtype}")
    if x.dtype == np.float32:
        return x
    if x.dtype.kind == "f":
        return x.astype(np.float32)
    raise InvalidArgument(f"model {info.name!r} takes float32 inputs, got dtype {x.dtype}")


def _check_values(info: ModelInfo, x: np.ndarray, what: str) -> None:
    if info.input_kind == "tokens":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= info.input_features:
            bad = lo if lo < 0 else hi
            raise InvalidArgument(
                f"{what} holds token id {bad}, outside the vocabulary [0, {info.input_features})")
    elif not np.isfinite(x).all():
        raise InvalidArgument(f"{what} holds NaN or Inf")


def check_steps(info: ModelInfo, x: np.ndarray, max_steps: int) -> np.ndarray:
    """One session's steps: (T, F) float32 or (T,) int64 -> the same, validated.

    A float (F,) and a token scalar () are one step.
    """
    x = _dtype_for(info, x)
    if info.input_kind == "tokens":
        if x.ndim == 0:
            x = x.reshape(1)
        if x.ndim != 1:
            raise InvalidArgument(
                f"step input for token model {info.name!r} must have shape (T,), got {x.shape}")
    else:
        if x.ndim == 1:
            if x.shape[0] != info.input_features:
                raise InvalidArgument(
                    f"model {info.name!r} takes {info.input_features} features per step, got {x.shape[0]}")
            x = x.reshape(1, -1)  # (F,) -> (1, F)
        if x.ndim != 2:
            raise InvalidArgument(
                f"step input for {info.name!r} must have shape (T, {info.input_features}) "
                f"or ({info.input_features},), got {x.shape}")
        if x.shape[1] != info.input_features:
            raise InvalidArgument(
                f"model {info.name!r} takes {info.input_features} features per step, got {x.shape[1]}")
    if x.shape[0] == 0:
        raise InvalidArgument("empty input: no steps")
    if x.shape[0] > max_steps:
        raise InvalidArgument(
            f"{x.shape[0]} steps in one request; at most {max_steps} (--max-steps-per-request)")
    _check_values(info, x, "input")
    return x


def check_batch(info: ModelInfo, x: np.ndarray, max_steps: int) -> np.ndarray:
    """Whole sequences: (B, T, F) float32 or (B, T) int64 -> validated."""
    x = _dtype_for(info, x)
    want = 2 if info.input_kind == "tokens" else 3
    if x.ndim != want:
        shape = "(batch, time)" if want == 2 else f"(batch, time, {info.input_features})"
        raise InvalidArgument(f"input for {info.name!r} must have shape {shape}, got {x.shape}")
    if want == 3 and x.shape[2] != info.input_features:
        raise InvalidArgument(
            f"model {info.name!r} takes {info.input_features} features per step, got {x.shape[2]}")
    if x.size == 0:
        raise InvalidArgument(f"empty input: shape {x.shape}")
    if x.shape[1] > max_steps:
        raise InvalidArgument(
            f"{x.shape[1]} steps per sequence; at most {max_steps} (--max-steps-per-request)")
    _check_values(info, x, "input")
    return x


def check_state(info: ModelInfo, s: np.ndarray | None, batch: int, name: str) -> np.ndarray | None:
    """An initial state (layers*directions, B, hidden) float32, or None."""
    if s is None:
        return None
    if s.dtype.kind != "f":
        raise InvalidArgument(f"{name} must be float32, got dtype {s.dtype}")
    s = s.astype(np.float32, copy=False)
    want = (info.layers * info.directions, batch, info.hidden)
    if s.shape != want:
        raise InvalidArgument(f"{name} must have shape {want}, got {s.shape}")
    if not np.isfinite(s).all():
        raise InvalidArgument(f"{name} holds NaN or Inf")
    return s


def bad_rows(info: ModelInfo, x: np.ndarray, batch: int) -> list[int]:
    """Rows of a (B, F) float / (B,) token batch that must be refused.

    The dtype and shape are the caller's to guarantee (it built x); values
    are checked here in one vectorised pass.
    """
    if x.shape[0] != batch:
        raise InvalidArgument(f"{x.shape[0]} input rows for {batch} sessions")
    if info.input_kind == "tokens":
        ok = (x >= 0) & (x < info.input_features)
    else:
        if x.ndim != 2 or x.shape[1] != info.input_features:
            raise InvalidArgument(
                f"model {info.name!r} takes {info.input_features} features per step, got {x.shape[1:]}")
        ok = np.isfinite(x).all(axis=1)
    if ok.all():
        return []
    return np.flatnonzero(~ok).tolist()


def bad_row_message(info: ModelInfo, row: np.ndarray) -> str:
    if info.input_kind == "tokens":
        return f"input holds token id {int(row)}, outside the vocabulary [0, {info.input_features})"
    return "input holds NaN or Inf"
