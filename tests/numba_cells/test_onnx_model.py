"""Parsing the ONNX file: what the spec reads, what gets folded, and refusals that
name the node and the reason. Plus parity on training/export.py's own files."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from numba_cells import CellError, load_cell, load_spec


def test_spec_of_a_normalised_torch_export(model_file):
    spec = load_spec(model_file("torch", cell="lstm", layers=2, hidden=64, features=5, normalize=True))
    assert (spec.cell, spec.layers, spec.hidden, spec.input_kind, spec.input_features,
            spec.output_size) == ("lstm", 2, 64, "float", 5, 2)
    # Sub(mean) then Div(std) folded into x * scale + shift; Mul/Add after the head kept
    assert spec.in_scale is not None and spec.in_scale.shape == (5,)
    assert spec.layer_weights[0].W.shape == (256, 5) and spec.layer_weights[1].W.shape == (256, 64)


def test_spec_of_a_token_model(model_file):
    spec = load_spec(model_file("torch", cell="lstm", layers=2, hidden=32, vocab=50, embed=12, out=7,
                                activation="softmax"))
    assert spec.input_kind == "tokens" and spec.input_features == 50
    assert spec.embedding.shape == (50, 12) and spec.activation == "Softmax"


def test_bidirectional_torch_export_is_refused(model_file):
    path = model_file("torch", cell="gru", layers=1, hidden=8, features=2, bidirectional=True)
    with pytest.raises(CellError, match=r"node '.*GRU.*'.*direction='bidirectional' cannot stream"):
        load_cell(path, device="cpu")


def test_hand_built_bidirectional_is_refused(model_file):
    with pytest.raises(CellError, match=r"node 'lstm_0' \(LSTM\): direction='bidirectional'"):
        load_spec(model_file("onnx", op="LSTM", layers=1, direction="bidirectional"))


def test_reverse_direction_is_refused(model_file):
    with pytest.raises(CellError, match="direction='reverse'"):
        load_spec(model_file("onnx", op="RNN", layers=1, direction="reverse"))


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "Abs"])
def test_unknown_op_between_layers_is_refused(model_file, op):
    with pytest.raises(CellError, match=rf"node 'odd_{op}' \({op}\) between recurrent layers "
                                        r"'lstm_0' and 'lstm_1' is not supported"):
        load_spec(model_file("onnx", op="LSTM", layers=2, between=op))


def test_plumbing_between_layers_is_allowed(model_file):
    assert load_spec(model_file("onnx", op="GRU", layers=2, between="Identity")).layers == 2


@pytest.mark.parametrize("attrs,message", [
    ({"clip": 3.0}, r"clipping \(clip=3.0\)"),
    ({"activations": ["Sigmoid", "Relu", "Tanh"]}, "activations"),
    ({"input_forget": 1}, "input_forget"),
])
def test_unsupported_attributes_are_refused(model_file, attrs, message):
    with pytest.raises(CellError, match=r"node 'lstm_0' \(LSTM\): .*" + message):
        load_spec(model_file("onnx", op="LSTM", layers=1, extra_attrs=attrs))


def _edit(path, tmp_path, fn):
    model = onnx.load(str(path))
    fn(model.graph)
    out = tmp_path / "edited.onnx"
    onnx.save(model, str(out))
    return out


def test_unknown_op_after_the_head_is_refused(model_file, tmp_path):
    def add_floor(g):
        g.node[-2].output[0] = "pre_floor" if g.node[-2].output[0] == "y" else g.node[-2].output[0]
        for n in g.node:
            if "y" in n.output:
                n.output[list(n.output).index("y")] = "pre_floor"
        g.node.append(helper.make_node("Floor", ["pre_floor"], ["y"], name="odd_floor"))

    path = _edit(model_file("onnx", op="RNN", layers=1), tmp_path, add_floor)
    with pytest.raises(CellError, match=r"node 'odd_floor' \(Floor\) after the head"):
        load_spec(path)


def test_non_affine_input_step_is_refused(model_file, tmp_path):
    def divide_const_by_x(g):
        g.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "one"))
        g.node.insert(0, helper.make_node("Div", ["one", "x"], ["inv_x"], name="inverse"))
        g.node[1].input[0] = "inv_x"

    with pytest.raises(CellError, match=r"node 'inverse': Div of a constant by the data"):
        load_spec(_edit(model_file("onnx", op="RNN", layers=1), tmp_path, divide_const_by_x))


def test_missing_file_and_garbage(tmp_path):
    with pytest.raises(CellError, match="cannot read ONNX file"):
        load_spec(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(CellError, match="cannot read ONNX file"):
        load_spec(tmp_path / "bad.onnx")


def test_bad_device_and_capacity(model_file):
    path = model_file("onnx", op="RNN", layers=1)
    with pytest.raises(CellError, match="unknown device 'tpu'"):
        load_cell(path, device="tpu")
    with pytest.raises(CellError, match="capacity must be at least 1"):
        load_cell(path, device="cpu", capacity=0)


# ------------------------------------------------ files made by training/export.py

def _export(tmp_path, config_kw, normalization=None):
    torch = pytest.importorskip("torch")
    export = pytest.importorskip("training.export")
    from training.model import Checkpoint, ModelConfig, SequenceModel

    torch.manual_seed(0)
    config = ModelConfig(**config_kw)
    model = SequenceModel(config).eval()
    ckpt = Checkpoint(model=config.to_dict(), task={"name": "test"}, train={}, normalization=normalization)
    path = tmp_path / "model.onnx"
    path.write_bytes(export.build_onnx(model, ckpt).SerializeToString())
    return path


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_training_export_regression_with_normalization(tmp_path, reference, cell):
    norm = {"mean": [10.0, -3.0], "std": [4.0, 0.5]}
    path = _export(tmp_path, dict(cell=cell, input_size=2, hidden=32, layers=2, head="regression",
                                  output_size=2), norm)
    spec = load_spec(path)
    np.testing.assert_allclose(spec.in_scale, [0.25, 2.0], rtol=1e-6)
    _stream_vs_ort(path, reference, scale=np.array(norm["std"], np.float32),
                   shift=np.array(norm["mean"], np.float32))


def test_training_export_token_classifier(tmp_path, reference):
    path = _export(tmp_path, dict(cell="gru", vocab_size=40, embed_dim=8, hidden=16, layers=2,
                                  head="classify", output_size=3))
    assert load_spec(path).input_kind == "tokens"
    _stream_vs_ort(path, reference)


def _stream_vs_ort(path, reference, scale=1.0, shift=0.0, B=3, T=120):
    cell = load_cell(path, device="cpu", capacity=B)
    rng = np.random.default_rng(0)
    s = cell.spec
    if s.input_kind == "tokens":
        x = rng.integers(1, s.input_features, (B, T), dtype=np.int64)
    else:
        x = (rng.standard_normal((B, T, s.input_features)) * scale + shift).astype(np.float32)
    h0 = np.zeros((s.layers, B, s.hidden), np.float32)
    want = reference(path, x, h0, h0.copy() if s.has_cell_state else None)
    got = np.stack([cell.step(x[:, t], np.arange(B)) for t in range(T)], 1)
    assert np.abs(got - want[0]).max() <= 1e-4
    assert np.abs(cell.read_many(np.arange(B))["h"].transpose(1, 0, 2) - want[1]).max() <= 1e-4


def test_layers_reading_the_wrong_state_row_are_refused(model_file, tmp_path):
    def swap_rows(g):
        for t in g.initializer:
            if t.name in ("s0h0", "e0h0"):
                t.CopyFrom(numpy_helper.from_array(np.array([1 if t.name == "s0h0" else 2], np.int64), t.name))
            elif t.name in ("s1h0", "e1h0"):
                t.CopyFrom(numpy_helper.from_array(np.array([0 if t.name == "s1h0" else 1], np.int64), t.name))

    with pytest.raises(CellError, match=r"node 'gru_0': layer 0 starts from row 1 of the state input 'h0'"):
        load_spec(_edit(model_file("onnx", op="GRU", layers=2), tmp_path, swap_rows))
