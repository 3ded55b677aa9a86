"""load_model_info: metadata round trip, bring-your-own models, malformed files."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from seqserve import artifact
from seqserve.artifact import ArtifactError, load_model_info
from training import export


def test_metadata_round_trip(make_run, repo):
    run, model, ckpt = make_run("sent", cell="gru", layers=2, bidirectional=True, tokens=True,
                                metrics={"val_acc": 0.75})
    path = export.export_run(run, repo, "sentiment", log=lambda *_: None)
    info = load_model_info(path)
    assert (info.name, info.version, info.path) == ("sentiment", 1, path)
    assert (info.cell, info.layers, info.hidden, info.directions) == ("gru", 2, 8, 2)
    assert (info.input_kind, info.input_features) == ("tokens", 40)
    assert (info.output_kind, info.output_size) == ("classify", 3)
    assert info.output_names == info.labels == ckpt.extra["labels"]
    assert info.vocab == ckpt.extra["vocab"] and info.tokenizer == ckpt.extra["tokenizer"]
    assert info.normalization is None
    assert info.metrics == {"val_acc": 0.75}  # metrics.json wins over the checkpoint's copy
    assert info.source_run == str(run) and info.task == "unit"
    assert not info.can_stream and info.state_names == ("h",)
    proto = onnx.load(path)
    assert info.content_hash == artifact.content_hash(proto) == artifact.read_metadata(proto)["content_hash"]
    for prop in proto.metadata_props:  # every value is JSON
        json.loads(prop.value)


def test_forecast_metadata_carries_normalisation(make_run, repo):
    run, _, ckpt = make_run(cell="lstm", layers=3)
    info = load_model_info(export.export_run(run, repo, "f", log=lambda *_: None))
    assert info.normalization == ckpt.normalization
    assert (info.input_kind, info.input_features, info.output_size) == ("float", 2, 2)
    assert info.output_names == ["level", "rate"]
    assert info.can_stream and info.state_names == ("h", "c")


def test_loader_needs_no_torch(make_run, repo):
    run, _, _ = make_run(cell="rnn")
    path = export.export_run(run, repo, "m", log=lambda *_: None)
    code = ("import sys; from seqserve.artifact import load_model_info; "
            f"i = load_model_info({str(path)!r}); assert 'torch' not in sys.modules; print(i.cell, i.layers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["rnn", "1"]


# ------------------------------------------------------------ bring your own model

class UserModel(nn.Module):
    """What a user writes: a plain torch cell + linear head, state passed explicitly."""

    def __init__(self, cell, features, hidden, layers, bidirectional, outputs):
        super().__init__()
        kind = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = kind(features, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), outputs)
        self.lstm = cell == "lstm"

    def forward(self, x, h0, c0=None):
        if self.lstm:
            out, (hn, cn) = self.rnn(x, (h0, c0))
            return self.head(out), hn, cn
        out, hn = self.rnn(x, h0)
        return self.head(out), hn


def export_like_the_docs(model, path, cell, features, hidden, states):
    """The recipe in docs/MODEL_FORMAT.md, written out by hand."""
    x = torch.randn(2, 5, features)
    h = torch.zeros(states, 2, hidden)
    args = (x, h, h.clone()) if cell == "lstm" else (x, h)
    ins = ["x", "h0", "c0"][: len(args)]
    outs = ["y", "hn", "cn"][: len(args)]
    axes = {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}}
    axes.update({n: {1: "batch"} for n in ins[1:] + outs[1:]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17,
                          input_names=ins, output_names=outs, dynamic_axes=axes)


@pytest.mark.parametrize("cell, layers, bidirectional", [("lstm", 1, False), ("gru", 2, True), ("rnn", 3, False)])
def test_bring_your_own_model(tmp_path, cell, layers, bidirectional):
    torch.manual_seed(0)
    dirs = 2 if bidirectional else 1
    model = UserModel(cell, features=3, hidden=6, layers=layers, bidirectional=bidirectional, outputs=4).eval()
    path = tmp_path / "model_repository" / "mine" / "3" / "model.onnx"
    path.parent.mkdir(parents=True)
    export_like_the_docs(model, path, cell, 3, 6, layers * dirs)

    info = load_model_info(path)
    assert (info.name, info.version, info.task, info.output_kind) == ("mine", 3, "custom", "regression")
    assert (info.cell, info.layers, info.hidden, info.directions) == (cell, layers, 6, dirs)
    assert (info.input_kind, info.input_features, info.output_size) == ("float", 3, 4)
    assert info.normalization is None and info.output_names == [] and len(info.content_hash) == 64
    assert artifact.list_models(tmp_path / "model_repository") == {"mine": [3]}

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 11, 3)).astype(np.float32)
    states = [np.full((layers * dirs, 3, 6), 0.1, np.float32) for _ in info.state_names]
    got = sess.run(None, dict(zip(["x", "h0", "c0"], [x, *states])))
    with torch.no_grad():
        want = model(torch.from_numpy(x), *[torch.from_numpy(s) for s in states])
    for g, w in zip(got, want):
        assert np.abs(g - w.numpy()).max() <= 1e-5


def test_byo_metadata_is_used_and_checked(tmp_path):
    torch.manual_seed(0)
    model = UserModel("gru", 1, 4, 1, False, 2).eval()
    path = tmp_path / "model.onnx"
    export_like_the_docs(model, path, "gru", 1, 4, 1)
    proto = onnx.load(path)
    artifact.write_metadata(proto, {"output_kind": "classify", "output_names": ["neg", "pos"]})
    onnx.save(proto, path)
    info = load_model_info(path)
    assert (info.output_kind, info.output_names, info.name, info.version) == ("classify", ["neg", "pos"], "model", 0)
    artifact.write_metadata(proto, {"hidden": 8})
    onnx.save(proto, path)
    with pytest.raises(ArtifactError, match="metadata says hidden=8 but the graph has hidden=4"):
        load_model_info(path)


# ------------------------------------------------------------ malformed files

@pytest.fixture
def exported(make_run, tmp_path):
    """(proto, save) for a valid LSTM export; save(proto) writes it and returns the path."""
    run, model, ckpt = make_run(cell="lstm", layers=2)
    proto = export.build_onnx(model, ckpt, str(run))

    def save(p):
        path = tmp_path / "edited.onnx"
        onnx.save(p, path)
        return path

    return proto, save


def edit_meta(proto, **changes):
    meta = artifact.read_metadata(proto)
    meta.update(changes)
    artifact.write_metadata(proto, meta)


def drop_input(proto, name):
    keep = [i for i in proto.graph.input if i.name != name]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)


def set_rank(proto, name, rank):
    vi = next(i for i in proto.graph.input if i.name == name)
    shape = vi.type.tensor_type.shape
    while len(shape.dim) > rank:
        shape.dim.pop()


def set_dtype(proto, name, elem_type):
    next(i for i in proto.graph.input if i.name == name).type.tensor_type.elem_type = elem_type


def rename_op(proto, old, new):
    for n in proto.graph.node:
        if n.op_type == old:
            n.op_type = new


def bump_weight(proto):
    init = next(t for t in proto.graph.initializer if t.name.startswith("onnx::LSTM"))
    w = onnx.numpy_helper.to_array(init).copy()
    w.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))


@pytest.mark.parametrize("edit, message", [
    (lambda p: drop_input(p, "c0"), "missing input 'c0'"),
    (lambda p: drop_input(p, "x"), "missing input 'x'"),
    (lambda p: set_rank(p, "x", 2), "input 'x' has rank 2 .*expected rank 3"),
    (lambda p: set_rank(p, "h0", 2), "input 'h0' has rank 2"),
    (lambda p: set_dtype(p, "h0", onnx.TensorProto.DOUBLE), "input 'h0' has dtype float64"),
    (lambda p: edit_meta(p, cell="transformer"), "unknown cell 'transformer'"),
    (lambda p: edit_meta(p, cell="gru"), "metadata says cell='gru' but the graph has cell='lstm'"),
    (lambda p: edit_meta(p, layers=3), "metadata says layers=3 but the graph has layers=2"),
    (lambda p: edit_meta(p, output_kind="embedding"), "unknown output_kind"),
    (lambda p: edit_meta(p, output_names=["a"]), "output_names has 1 entries but output_size is 2"),
    (lambda p: edit_meta(p, seqserve_format=99), "seqserve_format 99 is not supported"),
    (lambda p: rename_op(p, "LSTM", "LSTMX"), "fails onnx.checker: .*LSTMX"),
    (bump_weight, "content_hash does not match"),
])
def test_malformed_files_are_rejected_by_name(exported, edit, message):
    proto, save = exported
    edit(proto)
    with pytest.raises(ArtifactError, match=message):
        load_model_info(save(proto))


def test_no_recurrent_node_is_rejected(tmp_path):
    """A graph with the right names but no cell (e.g. someone's MLP) is not a sequence model."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 1])
    h0 = helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", 1])
    hn = helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"]),
                               helper.make_node("Identity", ["h0"], ["hn"])], "g", [x, h0], [y, hn])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # make_model stamps a newer IR than ORT 1.31 reads
    onnx.save(model, tmp_path / "mlp.onnx")
    with pytest.raises(ArtifactError, match="no recurrent node"):
        load_model_info(tmp_path / "mlp.onnx")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07not a protobuf at all" * 3)
    with pytest.raises(ArtifactError, match="junk.onnx: not a readable ONNX file"):
        load_model_info(tmp_path / "junk.onnx")
    with pytest.raises(ArtifactError, match="no such model file"):
        load_model_info(tmp_path / "absent.onnx")


def test_truncated_file_is_rejected(exported, tmp_path):
    proto, save = exported
    path = save(proto)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError):
        load_model_info(path)
