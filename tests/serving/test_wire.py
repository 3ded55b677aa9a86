"""serving.wire: hand-written StreamSteps bytes against protobuf's own encoding."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.seqserve.v1 import inference_pb2 as pb
from serving.wire import ReplyEncoder, StepIndex, parse_request


def _pb_reply(y: np.ndarray, position: int) -> bytes:
    reply = pb.StreamStepsResponse()
    r = reply.results.add(position=position)
    r.y.shape.extend(y.shape)
    r.y.float_data.extend(y.ravel().tolist())
    return reply.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(out=st.integers(1, 300), position=st.integers(1, 2**62),
       seed=st.integers(0, 2**32 - 1))
def test_step_reply_is_protobufs_encoding_byte_for_byte(out, position, seed):
    y = np.random.default_rng(seed).standard_normal((1, out)).astype(np.float32)
    enc = ReplyEncoder(out)
    got = enc.step_reply(y, position)
    assert got == _pb_reply(y, position)
    back = pb.StreamStepsResponse.FromString(got)
    assert back.results[0].position == position and list(back.results[0].y.shape) == [1, out]
    np.testing.assert_array_equal(np.array(back.results[0].y.float_data, np.float32), y[0])
    # the unary Step's reply is the inner StepResponse
    inner = pb.StepResponse(position=position, y=pb.Tensor(shape=[1, out], float_data=y[0].tolist()))
    assert enc.unary_reply(y, position) == inner.SerializeToString()


@pytest.mark.parametrize("position", [1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28, 2**63 - 1])
def test_reply_positions_at_every_varint_length_boundary(position):
    y = np.arange(3, dtype=np.float32).reshape(1, 3)
    assert ReplyEncoder(3).step_reply(y, position) == _pb_reply(y, position)


def _msg(key, values, **kw):
    return pb.StreamStepsRequest(steps=[pb.StepRequest(
        model="m", sequence_key=key, x=pb.Tensor(shape=[len(values)], float_data=values), **kw)])


@settings(max_examples=200, deadline=None)
@given(key=st.text(min_size=1, max_size=40), F=st.integers(1, 16), data=st.data())
def test_stream_message_index_reads_exactly_what_a_parse_reads_or_misses(key, F, data):
    floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
    first = data.draw(st.lists(floats, min_size=F, max_size=F))
    m = _msg(key, first)
    raw = m.SerializeToString()
    vals = list(m.steps[0].x.float_data)
    idx = StepIndex()
    idx.learn(raw, m, vals, "MS", key, "m")
    for _ in range(5):
        nxt = data.draw(st.lists(floats, min_size=F, max_size=F))
        raw2 = _msg(key, nxt).SerializeToString()
        ms, seq, model, got = idx.lookup(raw2)
        assert (ms, seq, model) == ("MS", key, "m")
        assert list(got) == list(parse_request(raw2).steps[0].x.float_data)
    # anything else about the message differs: no match
    assert idx.lookup(_msg(key + "x", first).SerializeToString()) is None
    assert idx.lookup(_msg(key, first, start=True).SerializeToString()) is None
    assert idx.lookup(_msg(key, first + [1.0]).SerializeToString()) is None


def test_stream_message_index_declines_a_non_canonical_message_and_is_not_fooled_by_a_key():
    m = _msg("dev-1", [0.25])
    raw = m.SerializeToString()
    idx = StepIndex()
    # the same message with an empty field appended is still valid protobuf, but not canonical
    idx.learn(raw + b"\x12\x00", m, [0.25], None, "dev-1", "m")
    assert not idx.known and idx.lookup(raw) is None
    # the floats' bytes also inside the key: the run at the end is still the floats
    key = "k" + struct.pack("<f", 0.25).decode("latin-1")
    m2 = _msg(key, [0.25])
    idx.learn(m2.SerializeToString(), m2, [0.25], None, key, "m")
    raw3 = _msg(key, [-3.5]).SerializeToString()
    assert list(idx.lookup(raw3)[3]) == list(parse_request(raw3).steps[0].x.float_data) == [-3.5]


def test_parse_request_passes_a_parsed_message_through_and_refuses_garbage():
    m = _msg("a", [1.0])
    assert parse_request(m) is m
    from google.protobuf.message import DecodeError
    with pytest.raises(DecodeError):
        parse_request(b"\xff\xff\xff")


def _step(key, values, **kw):
    return pb.StepRequest(model="m", sequence_key=key, x=pb.Tensor(shape=[len(values)], float_data=values), **kw)


@settings(max_examples=150, deadline=None)
@given(key=st.text(min_size=1, max_size=40), F=st.integers(1, 8), data=st.data())
def test_step_index_reads_exactly_what_a_parse_reads_or_misses(key, F, data):
    from serving.wire import StepIndex

    floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
    idx = StepIndex(limit=3)
    first = data.draw(st.lists(floats, min_size=F, max_size=F))
    m = _step(key, first)
    raw = m.SerializeToString()
    idx.learn(raw, m, list(m.x.float_data), "MS", key, "m")
    for _ in range(4):
        vals = data.draw(st.lists(floats, min_size=F, max_size=F))
        raw2 = _step(key, vals).SerializeToString()
        ms, seq, model, got = idx.lookup(raw2)
        assert (ms, seq, model) == ("MS", key, "m")
        assert list(got) == list(pb.StepRequest.FromString(raw2).x.float_data)
    # any other request misses: other session, a flag, another width
    assert idx.lookup(_step(key + "x", first).SerializeToString()) is None
    assert idx.lookup(_step(key, first, start=True).SerializeToString()) is None
    assert idx.lookup(_step(key, first + [0.5]).SerializeToString()) is None
    assert idx.lookup(b"") is None


def test_step_index_learns_only_canonical_plain_steps_and_stays_bounded():
    from serving.wire import StepIndex

    idx = StepIndex(limit=2)
    m = _step("a", [1.0])
    raw = m.SerializeToString()
    idx.learn(raw + b"\x30\x00", m, [1.0], "MS", "a", "m")  # not canonical (an explicit start=false)
    assert idx.lookup(raw) is None and not idx.known
    for key in ("a", "b", "c"):
        mk = _step(key, [1.0])
        idx.learn(mk.SerializeToString(), mk, [1.0], "MS", key, "m")
    assert len(idx.known) <= 2  # started afresh at the limit
    assert idx.lookup(_step("c", [2.0]).SerializeToString())[1] == "c"


def test_bytes_in_handlers_are_not_wrapped_by_the_guard():
    """Step and StreamSteps parse (and answer bad bytes) themselves: the guard
    adds no layer to them, and still guards a method that parses as usual."""
    from serving import native
    from serving.guard import Guarded

    class Fake:
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, service, handlers):
            self.handlers = handlers

    class Servicer(native.InferenceServicer):
        def __init__(self):
            pass

    fake, svc = Fake(), Servicer()
    native.add_to_server(svc, Guarded(fake))
    assert fake.handlers["Step"].unary_unary == svc.Step
    assert fake.handlers["StreamSteps"].stream_stream == svc.StreamSteps
    assert fake.handlers["Predict"].unary_unary != svc.Predict  # parsed by the guard's safe parser
