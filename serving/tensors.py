"""seqserve.v1.Tensor <-> numpy, with the checks a wire format needs."""
from __future__ import annotations

import math

import numpy as np

from protos.seqserve.v1 import inference_pb2 as pb
from serving.errors import InvalidArgument


_MAX_DIM = 2**31 - 1


def to_array(t: pb.Tensor, what: str = "x") -> np.ndarray:
    """A Tensor message -> float32 or int64 array of its declared shape.

    No shape: a flat array (the caller infers the step shape).
    """
    nf, ni = len(t.float_data), len(t.int64_data)
    if nf and ni:
        raise InvalidArgument(f"{what} sets both float_data and int64_data; use one")
    a = np.array(t.int64_data, np.int64) if ni else np.array(t.float_data, np.float32)
    if t.shape:
        shape = tuple(t.shape)
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"{what} shape {list(shape)} has a negative dimension")
        if len(shape) > 8 or any(d > _MAX_DIM for d in shape):
            # numpy cannot even describe such an array (even an empty one)
            raise InvalidArgument(f"{what} shape {list(shape)} is too large (rank <= 8, each "
                                  f"dimension <= {_MAX_DIM})")
        need = math.prod(shape)
        if need != a.size:
            raise InvalidArgument(f"{what} shape {list(shape)} needs {need} values, got {a.size}")
        a = a.reshape(shape)
    return a


def from_array(a: np.ndarray) -> pb.Tensor:
    """float arrays -> float_data, integer arrays -> int64_data."""
    if a.dtype.kind in "iu":
        return pb.Tensor(shape=a.shape, int64_data=a.ravel().tolist())
    return pb.Tensor(shape=a.shape, float_data=a.ravel().tolist())


def step_input(t: pb.Tensor, features: int, tokens: bool, what: str = "x") -> np.ndarray:
    """A step's x: a shapeless float tensor of k*F values becomes (k, F)."""
    a = to_array(t, what)
    if not t.shape and not tokens and a.size and a.size % features == 0:
        a = a.reshape(-1, features)
    return a
