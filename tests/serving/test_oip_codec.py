"""serving.oip_codec: OIP tensors <-> numpy, checked against tritonclient's encoding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import _utils as triton_utils

from protos.inference import messages as pb
from seqserve.artifact import ModelInfo
from serving import oip_codec as codec
from serving.errors import InvalidArgument


def lstm_info(**kw) -> ModelInfo:
    base = dict(name="m", version=1, path=Path("m.onnx"), task="sine", cell="lstm", layers=2,
                hidden=8, directions=1, input_kind="float", input_features=3,
                output_kind="regression", output_size=2)
    base.update(kw)
    return ModelInfo(**base)


def triton_request(inputs: dict[str, np.ndarray], datatypes=None, **kw):
    """A ModelInferRequest exactly as tritonclient builds it, parsed by our classes."""
    infer_inputs = []
    for name, array in inputs.items():
        dt = (datatypes or {}).get(name) or triton.np_to_triton_dtype(array.dtype)
        item = triton.InferInput(name, list(array.shape), dt)
        item.set_data_from_numpy(array)
        infer_inputs.append(item)
    args = dict(model_name="m", inputs=infer_inputs, model_version="", request_id="",
                outputs=None, sequence_id=0, sequence_start=False, sequence_end=False,
                priority=0, timeout=None, parameters=None)
    args.update(kw)
    wire = triton_utils._get_inference_request(**args).SerializeToString()
    return pb.ModelInferRequest.FromString(wire)


def typed_request(name: str, datatype: str, shape, field: str, values):
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name=name, datatype=datatype)
    tensor.shape.extend(shape)
    getattr(tensor.contents, field).extend(values)
    return request


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32])
def test_raw_round_trip_from_tritonclient(dtype):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 5, 3)) * 100).astype(dtype)
    decoded = codec.decode_inputs(triton_request({"x": x}))
    assert decoded["x"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded["x"], x)


@pytest.mark.parametrize("datatype,field,dtype", [
    ("FP32", "fp32_contents", np.float32), ("FP64", "fp64_contents", np.float64),
    ("INT64", "int64_contents", np.int64), ("INT32", "int_contents", np.int32),
])
def test_typed_contents(datatype, field, dtype):
    values = np.arange(12).astype(dtype) - 3
    decoded = codec.decode_inputs(typed_request("x", datatype, [2, 2, 3], field, values.tolist()))
    np.testing.assert_array_equal(decoded["x"], values.reshape(2, 2, 3))
    assert decoded["x"].dtype == np.dtype(dtype)


def test_byte_length_mismatch_names_the_sizes():
    request = triton_request({"x": np.zeros((1, 4, 3), np.float32)})
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    with pytest.raises(InvalidArgument, match=r"input 'x': shape \[1, 4, 3\] of FP32 needs 48 "
                                              r"bytes .* has 44 bytes"):
        codec.decode_inputs(request)


def test_typed_count_mismatch():
    request = typed_request("x", "FP32", [1, 2, 3], "fp32_contents", [1.0] * 5)
    with pytest.raises(InvalidArgument, match=r"shape \[1, 2, 3\] has 6 elements, but "
                                              r"contents.fp32_contents has 5"):
        codec.decode_inputs(request)


def test_typed_contents_in_the_wrong_field():
    request = typed_request("x", "FP32", [1, 1, 3], "fp64_contents", [1.0] * 3)
    with pytest.raises(InvalidArgument, match="FP32 takes its data in contents.fp32_contents, "
                                              "but contents.fp64_contents was set"):
        codec.decode_inputs(request)


def test_unsupported_datatype_and_negative_shape():
    request = typed_request("x", "BYTES", [1], "bytes_contents", [b"a"])
    with pytest.raises(InvalidArgument, match="datatype 'BYTES' is not supported; use one of FP32"):
        codec.decode_inputs(request)
    request = typed_request("x", "FP32", [1, -1, 3], "fp32_contents", [1.0] * 3)
    with pytest.raises(InvalidArgument, match="negative dimension"):
        codec.decode_inputs(request)


def test_raw_count_must_match_inputs_and_no_duplicates():
    request = triton_request({"x": np.zeros((1, 2, 3), np.float32),
                              "h0": np.zeros((2, 1, 8), np.float32)})
    del request.raw_input_contents[1]
    with pytest.raises(InvalidArgument, match="2 inputs but 1 raw_input_contents"):
        codec.decode_inputs(request)
    request = typed_request("x", "FP32", [1, 1, 3], "fp32_contents", [1.0] * 3)
    request.inputs.append(request.inputs[0])
    with pytest.raises(InvalidArgument, match="input 'x' is given twice"):
        codec.decode_inputs(request)


def test_model_inputs_convert_fp64_and_check_shape():
    info = lstm_info()
    x = np.random.default_rng(1).normal(size=(2, 4, 3))
    h0 = np.ones((2, 2, 8), np.float32)
    out = codec.model_inputs("m", info, triton_request({"x": x, "h0": h0}))
    assert out["x"].dtype == np.float32 and out["x"].shape == (2, 4, 3)
    np.testing.assert_allclose(out["x"], x.astype(np.float32))
    np.testing.assert_array_equal(out["h0"], h0)

    with pytest.raises(InvalidArgument, match=r"input 'x' of model 'm' must have shape "
                                              r"\[-1, -1, 3\] \(batch, time, features.*got \[2, 4\]"):
        codec.model_inputs("m", info, triton_request({"x": np.zeros((2, 4), np.float32)}))
    with pytest.raises(InvalidArgument, match=r"input 'x' of model 'm' has datatype FP32 .* got INT64"):
        codec.model_inputs("m", info, triton_request({"x": np.zeros((1, 4, 3), np.int64)}))
    with pytest.raises(InvalidArgument, match="has no input 'z'; its inputs are x, h0, c0"):
        codec.model_inputs("m", info, triton_request({"x": np.zeros((1, 4, 3), np.float32),
                                                      "z": np.zeros((1,), np.float32)}))
    with pytest.raises(InvalidArgument, match="input 'h0' of model 'm' has batch 2 .* x has batch 1"):
        codec.model_inputs("m", info, triton_request({"x": np.zeros((1, 4, 3), np.float32),
                                                      "h0": h0}))
    with pytest.raises(InvalidArgument, match="needs input 'x'"):
        codec.model_inputs("m", info, triton_request({"h0": h0}))
    with pytest.raises(InvalidArgument, match="is empty"):
        codec.model_inputs("m", info, triton_request({"x": np.zeros((1, 0, 3), np.float32)}))
    with pytest.raises(InvalidArgument, match="FP64 values do not fit FP32"):
        codec.model_inputs("m", info, triton_request({"x": np.full((1, 1, 3), 1e300)}))


def test_token_model_takes_int32_as_int64_and_refuses_floats():
    info = lstm_info(cell="gru", input_kind="tokens", input_features=50)
    specs_in, specs_out = codec.model_specs(info)
    assert [s.name for s in specs_in] == ["x", "h0"] and [s.name for s in specs_out] == ["y", "hn"]
    ids = np.array([[1, 4, 9]], np.int32)
    out = codec.model_inputs("m", info, triton_request({"x": ids}))
    assert out["x"].dtype == np.int64
    np.testing.assert_array_equal(out["x"], ids)
    with pytest.raises(InvalidArgument, match="has datatype INT64 .* got FP32"):
        codec.model_inputs("m", info, triton_request({"x": ids.astype(np.float32)}))


def test_encode_response_is_what_tritonclient_decodes():
    rng = np.random.default_rng(2)
    outputs = {"y": rng.normal(size=(1, 3, 2)).astype(np.float32),
               "hn": rng.normal(size=(2, 1, 8)).astype(np.float32)}
    response = codec.encode_response(pb.ModelInferResponse(model_name="m"), outputs, ["hn", "y"])
    wire = triton.service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    result = triton.InferResult(wire)
    np.testing.assert_array_equal(result.as_numpy("y"), outputs["y"])
    np.testing.assert_array_equal(result.as_numpy("hn"), outputs["hn"])
    assert [o.name for o in wire.outputs] == ["hn", "y"]
    assert not wire.outputs[0].HasField("contents")


def test_requested_outputs():
    request = pb.ModelInferRequest()
    assert codec.requested_outputs("m", request, ["y", "hn"]) == ["y", "hn"]
    request.outputs.add(name="hn")
    assert codec.requested_outputs("m", request, ["y", "hn"]) == ["hn"]
    request.outputs.add(name="cn")
    with pytest.raises(InvalidArgument, match="cannot return output 'cn' here; available outputs: y, hn"):
        codec.requested_outputs("m", request, ["y", "hn"])
    request = pb.ModelInferRequest()
    request.outputs.add(name="y").parameters["classification"].int64_param = 3
    with pytest.raises(InvalidArgument, match="classification extension is not supported"):
        codec.requested_outputs("m", request, ["y", "hn"])


def test_sequence_parameters_as_tritonclient_sends_them():
    x = {"x": np.zeros((1, 1, 3), np.float32)}
    assert codec.sequence_control(triton_request(x)) == codec.SequenceControl(None)
    control = codec.sequence_control(triton_request(x, sequence_id=42, sequence_start=True))
    assert control == codec.SequenceControl(42, start=True, end=False)
    control = codec.sequence_control(triton_request(x, sequence_id="dev-7", sequence_end=True))
    assert control == codec.SequenceControl("dev-7", start=False, end=True)


def test_sequence_parameter_errors():
    request = pb.ModelInferRequest()
    request.parameters["sequence_start"].bool_param = True
    with pytest.raises(InvalidArgument, match="need a non-zero sequence_id"):
        codec.sequence_control(request)
    request = pb.ModelInferRequest()
    request.parameters["sequence_id"].double_param = 1.5
    with pytest.raises(InvalidArgument, match="must be an int64_param, uint64_param or string_param"):
        codec.sequence_control(request)
    request = pb.ModelInferRequest()
    request.parameters["sequence_id"].int64_param = 3
    request.parameters["sequence_end"].int64_param = 1
    with pytest.raises(InvalidArgument, match="'sequence_end' must be a bool_param"):
        codec.sequence_control(request)


# ---- properties over random shapes and datatypes, with tritonclient as the reference ----

DTYPES = [np.float32, np.float64, np.int64, np.int32]


@st.composite
def arrays(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).normal(size=shape) * 1000
    return values.astype(dtype)


@settings(max_examples=60, deadline=None)
@given(arrays(), st.integers(-3, 3))
def test_raw_decode_matches_tritonclient_encoding(array, extra_bytes):
    request = triton_request({"x": array})
    if extra_bytes == 0:
        np.testing.assert_array_equal(codec.decode_inputs(request)["x"], array)
        return
    raw = request.raw_input_contents[0]
    request.raw_input_contents[0] = raw + b"\0" * extra_bytes if extra_bytes > 0 else raw[:extra_bytes]
    if len(request.raw_input_contents[0]) == len(raw):  # nothing to cut from an empty tensor
        return
    with pytest.raises(InvalidArgument, match=f"needs {array.nbytes} bytes"):
        codec.decode_inputs(request)


@settings(max_examples=60, deadline=None)
@given(arrays())
def test_encoded_outputs_decode_in_tritonclient(array):
    response = codec.encode_response(pb.ModelInferResponse(), {"y": array}, ["y"])
    result = triton.InferResult(
        triton.service_pb2.ModelInferResponse.FromString(response.SerializeToString()))
    assert response.outputs[0].datatype == triton.np_to_triton_dtype(array.dtype)
    got = result.as_numpy("y")
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_one_float_step_fast_path_agrees_with_the_general_path():
    info = lstm_info()
    x = np.array([[[0.5, -2.0, 3.25]]], np.float32)  # (1, 1, F)
    fast = codec.one_float_step(triton_request({"x": x}), info)
    assert fast.dtype == np.float32 and fast.shape == (1, 3)
    np.testing.assert_array_equal(fast, codec.model_inputs("m", info, triton_request({"x": x}))["x"][0])
    typed = typed_request("x", "FP32", [1, 1, 3], "fp32_contents", x.ravel().tolist())
    np.testing.assert_array_equal(codec.one_float_step(typed, info), fast)
    # anything else goes the general way, which checks it and names the problem
    others = [
        triton_request({"x": np.zeros((1, 2, 3), np.float32)}),             # two steps
        triton_request({"x": x.astype(np.float64)}),                         # FP64
        triton_request({"x": np.array([[[np.nan, 0, 0]]], np.float32)}),     # NaN
        triton_request({"x": x, "h0": np.zeros((2, 1, 8), np.float32)}),    # extra input
        triton_request({"x": np.zeros((1, 1, 2), np.float32)}),             # wrong F
    ]
    cut = triton_request({"x": x})
    cut.raw_input_contents[0] = cut.raw_input_contents[0][:-1]
    others.append(cut)
    for request in others:
        assert codec.one_float_step(request, info) is None
    tokens = lstm_info(input_kind="tokens", input_features=50)
    assert codec.one_float_step(triton_request({"x": x}), tokens) is None
