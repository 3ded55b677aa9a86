"""Open Inference Protocol tensors <-> numpy, and the checks between them.

Requests may carry each input as `raw_input_contents` (what tritonclient
sends: little-endian row-major bytes, one entry per input in order) or as
typed `contents` (fp32_contents, int64_contents, ...). Replies always go in
`raw_output_contents`, because tritonclient decodes outputs only from there.

Every mismatch between declared datatype, shape and data is INVALID_ARGUMENT
with a message that names the input and says what to send instead.
This module knows OIP messages and numpy; it never touches a model runtime.
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import numpy as np

from serving.errors import InvalidArgument

# OIP datatype -> (numpy little-endian dtype, InferTensorContents field)
DATATYPES = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
}
_CONTENT_FIELDS = (
    "bool_contents", "int_contents", "int64_contents", "uint_contents",
    "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents",
)
_NP_TO_DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
                   np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}
# What a model's input accepts, and what it is converted to. FP64 and INT32 are
# converted without loss of meaning (values are checked where it matters).
_ACCEPTS = {
    "FP32": ("FP32", "FP64"),
    "INT64": ("INT64", "INT32"),
}


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


MAX_RANK = 8
MAX_DIM = 2**31 - 1


def decode_tensor(tensor, raw: bytes | None) -> np.ndarray:
    """One InferInputTensor (+ its raw bytes, if the request used raw) -> array."""
    name = tensor.name
    if tensor.datatype not in DATATYPES:
        raise InvalidArgument(
            f"input '{name}': datatype '{tensor.datatype}' is not supported; "
            f"use one of {', '.join(DATATYPES)}"
        )
    dtype, field = DATATYPES[tensor.datatype]
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"input '{name}': shape {_shape_text(shape)} has a negative dimension; "
            f"send the actual size of every axis"
        )
    # numpy cannot describe such arrays at all (even empty ones): refuse them
    # here rather than let reshape fail with an internal error
    if len(shape) > MAX_RANK or any(d > MAX_DIM for d in shape):
        raise InvalidArgument(
            f"input '{name}': shape {_shape_text(shape)} is out of range: at most "
            f"{MAX_RANK} axes of at most {MAX_DIM} each"
        )
    count = math.prod(shape)
    if raw is not None:
        if tensor.HasField("contents") and any(
            len(getattr(tensor.contents, f)) for f in _CONTENT_FIELDS
        ):
            raise InvalidArgument(
                f"input '{name}': data given both in contents and in raw_input_contents; use one"
            )
        need = count * dtype.itemsize
        if len(raw) != need:
            raise InvalidArgument(
                f"input '{name}': shape {_shape_text(shape)} of {tensor.datatype} needs "
                f"{need} bytes ({count} x {dtype.itemsize}), but its raw_input_contents "
                f"has {len(raw)} bytes"
            )
        # frombuffer over bytes is read-only; runtimes (Numba specialises on
        # read-only arrays and would compile again) get a writable copy
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    for other in _CONTENT_FIELDS:
        if other != field and len(getattr(tensor.contents, other)):
            raise InvalidArgument(
                f"input '{name}': datatype {tensor.datatype} takes its data in contents.{field}, "
                f"but contents.{other} was set"
            )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': shape {_shape_text(shape)} has {count} elements, but "
            f"contents.{field} has {len(values)}"
        )
    return np.asarray(values, dtype=dtype).reshape(shape)


def decode_inputs(request) -> dict[str, np.ndarray]:
    """ModelInferRequest -> {input name: array as declared (datatype, shape)}."""
    raws = request.raw_input_contents
    if len(raws) and len(raws) != len(request.inputs):
        raise InvalidArgument(
            f"request has {len(request.inputs)} inputs but {len(raws)} raw_input_contents; "
            f"raw data needs one entry per input, in the order of inputs"
        )
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise InvalidArgument(f"input '{tensor.name}' is given twice")
        out[tensor.name] = decode_tensor(tensor, raws[i] if len(raws) else None)
    return out


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as OIP describes it (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # names of the axes, for messages


def model_specs(info) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of a served model, from its artifact metadata.

    info: seqserve.artifact.ModelInfo. Batch and time are dynamic (-1); the
    state's batch axis too, since it follows x's batch.
    """
    return _specs(info.input_kind, info.input_features, info.layers * info.directions,
                  info.hidden, info.output_size, tuple(info.state_names))


@functools.lru_cache(maxsize=256)  # every request asks; the answer depends on these alone
def _specs(input_kind, features, state_rows, hidden, outputs, state_names):
    if input_kind == "tokens":
        x = TensorSpec("x", "INT64", (-1, -1), ("batch", "time"))
    else:
        x = TensorSpec("x", "FP32", (-1, -1, features), ("batch", "time", "features"))
    state_axes = ("layers*directions", "batch", "hidden")
    states = [TensorSpec(f"{s}0", "FP32", (state_rows, -1, hidden), state_axes)
              for s in state_names]
    y = TensorSpec("y", "FP32", (-1, -1, outputs), ("batch", "time", "outputs"))
    finals = [TensorSpec(f"{s}n", "FP32", (state_rows, -1, hidden), state_axes)
              for s in state_names]
    return (x, *states), (y, *finals)


def conform(model: str, spec: TensorSpec, array: np.ndarray, datatype: str) -> np.ndarray:
    """Check one decoded input against its spec; convert FP64->FP32, INT32->INT64."""
    if datatype not in _ACCEPTS[spec.datatype]:
        raise InvalidArgument(
            f"input '{spec.name}' of model '{model}' has datatype {spec.datatype} "
            f"(shape {_shape_text(spec.shape)} = {', '.join(spec.axes)}), got {datatype}"
        )
    shape = array.shape
    fits = len(shape) == len(spec.shape) and all(
        want in (-1, got) for want, got in zip(spec.shape, shape)
    )
    if not fits:
        raise InvalidArgument(
            f"input '{spec.name}' of model '{model}' must have shape {_shape_text(spec.shape)} "
            f"({', '.join(spec.axes)}; -1 = any), got {_shape_text(shape)}"
        )
    if array.size == 0:
        raise InvalidArgument(
            f"input '{spec.name}' of model '{model}' is empty (shape {_shape_text(shape)}); "
            f"send at least one step"
        )
    want = DATATYPES[spec.datatype][0]
    if array.dtype != want:
        if spec.datatype == "INT64":
            array = array.astype(np.int64)
        else:
            with np.errstate(over="ignore"):  # reported just below
                array = array.astype(np.float32)
            if not np.all(np.isfinite(array)):
                raise InvalidArgument(
                    f"input '{spec.name}' of model '{model}': FP64 values do not fit FP32 "
                    f"(overflow to inf or NaN); send FP32"
                )
    return array


def model_inputs(model: str, info, request) -> dict[str, np.ndarray]:
    """Decode and check every input of REQUEST for the served model INFO."""
    specs, _ = model_specs(info)
    by_name = {s.name: s for s in specs}
    declared = {t.name: t.datatype for t in request.inputs}
    arrays = decode_inputs(request)
    out = {}
    for name, array in arrays.items():
        if name not in by_name:
            raise InvalidArgument(
                f"model '{model}' has no input '{name}'; its inputs are {', '.join(by_name)}"
            )
        out[name] = conform(model, by_name[name], array, declared[name])
    if "x" not in out:
        raise InvalidArgument(f"model '{model}' needs input 'x' ({specs[0].datatype} "
                              f"{_shape_text(specs[0].shape)} = {', '.join(specs[0].axes)})")
    batch = out["x"].shape[0]
    for name in out:
        if name != "x" and out[name].shape[1] != batch:
            raise InvalidArgument(
                f"input '{name}' of model '{model}' has batch {out[name].shape[1]} "
                f"(axis 1) but x has batch {batch}"
            )
    return out


def requested_outputs(model: str, request, available: list[str]) -> list[str]:
    """Names of the outputs to send: those requested, in request order, or all."""
    if not len(request.outputs):
        return list(available)
    names = []
    for out in request.outputs:
        if out.name not in available:
            raise InvalidArgument(
                f"model '{model}' cannot return output '{out.name}' here; "
                f"available outputs: {', '.join(available)}"
            )
        if "classification" in out.parameters:
            # Triton would answer top-k labels as BYTES; raw logits under the
            # same name would be misread, so refuse instead of ignoring it
            raise InvalidArgument(
                f"output '{out.name}': the classification extension is not supported; "
                f"request the raw output and take the top classes on the client"
            )
        if out.name not in names:
            names.append(out.name)
    return names


def encode_response(response, outputs: dict[str, np.ndarray], names: list[str]):
    """Fill RESPONSE (a ModelInferResponse) with NAMES from OUTPUTS, raw bytes."""
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        datatype = _NP_TO_DATATYPE.get(array.dtype)
        if datatype is None:  # a runtime answered something odd; send FP32
            array, datatype = array.astype(np.float32), "FP32"
        want = DATATYPES[datatype][0]
        if array.dtype != want:  # big-endian host: the wire is little-endian
            array = array.astype(want)
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def one_float_step(request, info) -> np.ndarray | None:
    """The common sequence request, one step of F finite floats, as (1, F) float32.

    Only input x, FP32, shape [1, 1, F], raw bytes or fp32_contents, a float
    model with F <= 16. None for anything else: the general path
    (model_inputs) checks that and names the problem. For a handful of
    values, Python's struct and isfinite cost less than numpy's per-call
    overhead, and the session manager need not check the step again.
    """
    if len(request.inputs) != 1 or info.input_kind != "float":
        return None
    tensor = request.inputs[0]
    F = info.input_features
    if (tensor.name != "x" or tensor.datatype != "FP32" or F > 16
            or list(tensor.shape) != [1, 1, F]):
        return None
    raws = request.raw_input_contents
    if len(raws):
        if len(raws) != 1 or len(raws[0]) != 4 * F or tensor.HasField("contents"):
            return None
        values = struct.unpack(f"<{F}f", raws[0])
    else:
        values = tensor.contents.fp32_contents
        if len(values) != F or any(
            len(getattr(tensor.contents, f)) for f in _CONTENT_FIELDS if f != "fp32_contents"
        ):
            return None
    for v in values:
        if not math.isfinite(v):
            return None
    return np.array(values, np.float32).reshape(1, F)


@dataclass(frozen=True)
class SequenceControl:
    """Triton's sequence parameters of one request (sequence_id None = stateless)."""

    sequence_id: int | str | None
    start: bool = False
    end: bool = False


def _bool_param(params, key: str) -> bool:
    if key not in params:
        return False
    p = params[key]
    kind = p.WhichOneof("parameter_choice")
    if kind != "bool_param":
        raise InvalidArgument(f"parameter '{key}' must be a bool_param, got {kind or 'no value'}")
    return p.bool_param


def sequence_control(request) -> SequenceControl:
    """Read sequence_id / sequence_start / sequence_end from request parameters."""
    params = request.parameters
    sequence_id: int | str | None = None
    if "sequence_id" in params:
        p = params["sequence_id"]
        kind = p.WhichOneof("parameter_choice")
        if kind in ("int64_param", "uint64_param"):
            value = getattr(p, kind)
            if value < 0:
                raise InvalidArgument(f"sequence_id must not be negative, got {value}")
            sequence_id = value or None  # 0 means "no sequence", as in Triton
        elif kind == "string_param":
            sequence_id = p.string_param or None
        else:
            raise InvalidArgument(
                f"parameter 'sequence_id' must be an int64_param, uint64_param or "
                f"string_param, got {kind or 'no value'}"
            )
    start = _bool_param(params, "sequence_start")
    end = _bool_param(params, "sequence_end")
    if sequence_id is None and (start or end):
        raise InvalidArgument(
            "sequence_start / sequence_end need a non-zero sequence_id in the request parameters"
        )
    return SequenceControl(sequence_id, start, end)
