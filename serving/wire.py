"""Step and StreamSteps on the wire: the common message read and answered as bytes.

A device streaming its values sends, step after step, the same request but
for the numbers: one StepRequest (alone for Step, wrapped in a
StreamStepsRequest for StreamSteps) with the same model, the same sequence
id and no flags. In protobuf's canonical encoding such a request ENDS with
its x.float_data, a packed run of F little-endian float32s (x is the last
field set, float_data the last field of x), so its bytes are `head +
floats`. Protobuf decoding is a pure function of the bytes and fixed32
floats cannot change the structure around them, so a request whose bytes
minus the last 4F equal the head of a plain step met before IS that step
with new values: `StepIndex.lookup(raw)` reads them with one dict lookup and
one struct call instead of a parse and a dozen field reads. Anything else
(another head, a request not in canonical encoding) is not found, and goes
through the protobuf parse and the general checks as before.

The reply of a step, StepResponse{y: Tensor{shape: [1, out], float_data: y},
position} (inside a StreamStepsResponse for StreamSteps), is written the
same way by `ReplyEncoder` (tests compare it byte for byte with protobuf's
own encoding).

`stream_steps_handler` / `step_handler` register the two methods with bytes
in (the servicer parses what it does not recognise) and bytes out.

`plain_steps` is each message's first call: serving._hotpath (C) recognises,
runs and answers a plain step in one call where it is built, and hands back
whatever it does not decide; without it, StepIndex.lookup.
"""
from __future__ import annotations

import struct
import sys

import numpy as np

from protos.seqserve.v1 import inference_pb2 as pb

_FIELD_1_LEN = b"\x0a"  # field 1, length-delimited: results / y / shape
_FIELD_2_LEN = b"\x12"  # field 2, length-delimited: float_data
_FIELD_2_VARINT = b"\x10"  # field 2, varint: position
_LITTLE = sys.byteorder == "little"  # float32 bytes as protobuf wants them: little-endian


if _LITTLE:
    _floats = np.ndarray.tobytes  # float32 bytes of y: a C method, no Python frame per reply
else:
    def _floats(y) -> bytes:
        return y.astype("<f4").tobytes()


def _varint(n: int) -> bytes:
    if n < 0x200000:  # lengths and positions up to 2 million: no loop
        if n < 0x80:
            return _SMALL[n]
        if n < 0x4000:
            return bytes(((n & 0x7F) | 0x80, n >> 7))
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]


def _check_field_numbers() -> None:
    """The constants above, checked against the compiled descriptors at import."""
    want = {(pb.StreamStepsResponse, "results"): 1, (pb.StepResponse, "y"): 1,
            (pb.StepResponse, "position"): 2, (pb.Tensor, "shape"): 1, (pb.Tensor, "float_data"): 2}
    for (msg, field), number in want.items():
        got = msg.DESCRIPTOR.fields_by_name[field].number
        if got != number:  # the proto changed: this module must follow
            raise RuntimeError(f"{msg.DESCRIPTOR.full_name}.{field} is field {got}, wire.py assumes {number}")


_check_field_numbers()


class ReplyEncoder:
    """StreamStepsResponse bytes for one step's (1, out) float32 y and position."""

    __slots__ = ("out", "_y_head", "_outer")

    def __init__(self, out: int):
        self.out = out
        shape = _varint(1) + _varint(out)
        tensor_len = 1 + len(_varint(len(shape))) + len(shape) + 1 + len(_varint(4 * out)) + 4 * out
        # StepResponse up to y's floats: y's tag and length, shape, float_data's tag and length
        self._y_head = (_FIELD_1_LEN + _varint(tensor_len) + _FIELD_1_LEN + _varint(len(shape))
                        + shape + _FIELD_2_LEN + _varint(4 * out))
        # StreamStepsResponse up to y's floats, by the position's varint length (1-10 bytes)
        step_len = len(self._y_head) + 4 * out + 1  # + the position's varint
        self._outer = [None] + [_FIELD_1_LEN + _varint(step_len + k) + self._y_head
                                for k in range(1, 11)]

    def unary_reply(self, y, position: int) -> bytes:
        """StepResponse bytes (the unary Step's reply). y: float32 C-contiguous,
        `out` values (a (1, out) row); position >= 1."""
        return self._y_head + _floats(y) + _FIELD_2_VARINT + _varint(position)

    def step_reply(self, y, position: int) -> bytes:
        """StreamStepsResponse bytes holding that one StepResponse."""
        pos = _varint(position)
        return self._outer[len(pos)] + _floats(y) + _FIELD_2_VARINT + pos


class StepIndex:
    """Plain steps met before, looked up by their bytes (see module doc).

    One index per request type (StepRequest, StreamStepsRequest). One dict
    lookup per float width seen (in practice one); an entry names the model
    and the session, never a slot or a tenant (those are looked up per
    call). At `limit` heads it starts afresh.
    """

    __slots__ = ("known", "widths", "limit")

    def __init__(self, limit: int = 4096):
        self.known: dict[bytes, tuple] = {}  # head -> (width, fmt, ms, sequence id, model)
        self.widths: list[int] = []
        self.limit = limit

    def lookup(self, raw: bytes, tenant: str = ""):
        """-> (ms, sequence id, model, values) for a request met before, else None.
        tenant: unused (entries never name one); plain_steps' calling convention."""
        for width in self.widths:
            hit = self.known.get(raw[:-width])
            if hit is not None and hit[0] == width:
                return hit[2], hit[3], hit[4], hit[1].unpack_from(raw, len(raw) - width)
        return None

    def learn(self, raw: bytes, message, values, ms, sequence_id, model: str) -> None:
        """message: `raw` parsed, a plain step whose x.float_data are `values`."""
        run = struct.pack(f"<{len(values)}f", *values)
        if not raw.endswith(run) or message.SerializeToString() != raw:
            return
        if len(self.known) >= self.limit:
            self.known.clear()
        width = len(run)
        self.known[raw[:-width]] = (width, struct.Struct(f"<{len(values)}f"), ms, sequence_id, model)
        if width not in self.widths:
            self.widths.append(width)


def _native():
    """serving._hotpath.PlainSteps when the C extension is built and not turned off
    (SEQSERVE_HOTPATH=python), else None."""
    import os
    if os.environ.get("SEQSERVE_HOTPATH", "native") == "python":
        return None
    try:
        from serving._hotpath import PlainSteps
    except ImportError:  # built without a C compiler: the Python path serves
        return None
    return PlainSteps


NATIVE = _native()
HOTPATH = "native (C)" if NATIVE is not None else "python"  # what the server logs


def plain_steps(index: StepIndex, sessions, window: float, queue_item, unary: bool):
    """The first call on every Step / StreamSteps message: f(raw, tenant) ->

      bytes   the reply: a plain step met before, of a live session, run
              inline (a quiet model) by serving._hotpath in one compiled call;
      future  the same step queued for the model's next batch (a busy
              model): awaiting it gives (y, position) or raises the step's
              error, as try_plain_step's future;
      tuple   (ms, sequence id, model, values), what index.lookup gives: a
              plain step met before, for the caller to finish as before;
      None    not a step met before.

    Without the C extension (or with SEQSERVE_HOTPATH=python) it is
    index.lookup, which only answers tuples and None. sessions: the
    SessionManager; window: its BATCH_WINDOW_S; queue_item: its _Plain."""
    if NATIVE is not None:
        return NATIVE(index, sessions, window, queue_item, unary)
    return index.lookup


def stream_steps_handler(behaviour):
    """StreamSteps' method handler: bytes in, bytes out. No (de)serializer:
    gRPC hands the request bytes over and sends the reply bytes as they are,
    with no Python call per message; the servicer parses what its StepIndex
    does not recognise and serializes every reply itself."""
    import grpc

    return grpc.stream_stream_rpc_method_handler(behaviour)


def step_handler(behaviour):
    """Step's method handler: bytes in, bytes out, as stream_steps_handler."""
    import grpc

    return grpc.unary_unary_rpc_method_handler(behaviour)


def parse_request(raw) -> pb.StreamStepsRequest:
    """A StreamStepsRequest from the wire (or one already parsed, for in-process callers)."""
    return pb.StreamStepsRequest.FromString(raw) if raw.__class__ is bytes else raw
