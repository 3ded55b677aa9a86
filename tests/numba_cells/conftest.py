"""Model files for the cell tests: torch exports (legacy exporter, as training/export.py
does) and hand-built ONNX graphs for what torch cannot emit (peepholes, GRU with
linear_before_reset=0, graphs the cell must refuse). Every file is made once per
session; ONNX Runtime on the same file is the reference."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # ORT 1.31 reads up to 13; onnx.helper would stamp 14
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def ort_session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_reference(path, x, h0, c0=None):
    """Whole sequences through ONNX Runtime: x (B, T, ...), h0 (L, B, H) -> y, hn[, cn]."""
    sess = ort_session(path)
    feeds = {"x": x, "h0": h0}
    if c0 is not None:
        feeds["c0"] = c0
    return sess.run(None, feeds)


def export_torch(path, cell, layers, hidden, features=1, out=2, vocab=0, embed=16,
                 normalize=False, activation=None, bidirectional=False, seed=0):
    """Export a small torch model the way training/export.py does (legacy exporter, opset 17)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, embed) if vocab else None
            core_in = embed if vocab else features
            self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](
                core_in, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
            self.head = nn.Linear(hidden * (2 if bidirectional else 1), out)
            if normalize:
                self.register_buffer("mean", torch.tensor(rng.normal(0, 2, features), dtype=torch.float32))
                self.register_buffer("std", torch.tensor(rng.uniform(0.5, 3, features), dtype=torch.float32))
                self.register_buffer("ymean", torch.tensor(rng.normal(0, 5, out), dtype=torch.float32))
                self.register_buffer("ystd", torch.tensor(rng.uniform(0.5, 3, out), dtype=torch.float32))

        def forward(self, x, h0, c0=None):
            if self.emb is not None:
                x = self.emb(x)
            if normalize:
                x = (x - self.mean) / self.std
            state = (h0, c0) if cell == "lstm" else h0
            seq, state = self.rnn(x, state)
            y = self.head(seq)
            if activation == "sigmoid":
                y = torch.sigmoid(y)
            elif activation == "softmax":
                y = torch.softmax(y, dim=-1)
            if normalize:
                y = y * self.ystd + self.ymean
            return (y, *state) if cell == "lstm" else (y, state)

    net = Net().eval()
    dirs = 2 if bidirectional else 1
    x = torch.randint(0, vocab, (2, 5)) if vocab else torch.randn(2, 5, features)
    h0 = torch.zeros(layers * dirs, 2, hidden)
    args = (x, h0, h0.clone()) if cell == "lstm" else (x, h0)
    ins = ["x", "h0", "c0"][: len(args)]
    outs = ["y", "hn", "cn"][: len(args)]
    axes = {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}}
    axes.update({n: {1: "batch"} for n in ins[1:] + outs[1:]})
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, args, buf, dynamo=False, opset_version=17, input_names=ins,
                          output_names=outs, dynamic_axes=axes)
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = IR_VERSION
    onnx.save(proto, str(path))
    return path


def build_onnx(path, op="LSTM", layers=1, hidden=8, features=3, out=2, peephole=False,
               linear_before_reset=0, direction="forward", between=None, extra_attrs=None, seed=0):
    """Hand-built graph: x (B,T,F) -> Transpose -> [op per layer] -> Transpose -> MatMul+Add -> y.

    between: an op type inserted between layer 0 and 1 (to test refusals).
    """
    rng = np.random.default_rng(seed)
    G, H = GATES[op], hidden
    dirs = 2 if direction == "bidirectional" else 1
    nodes, inits = [], []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def ints(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a, np.int64), name))
        return name

    nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time_major"))
    cur, width = "xt", features
    hn, cn = [], []
    for l in range(layers):
        if l == 1 and between:
            nodes.append(helper.make_node(between, [cur], [f"{between}_out"], name=f"odd_{between}"))
            cur = f"{between}_out"
        W = const(f"W{l}", rng.uniform(-0.5, 0.5, (dirs, G * H, width)))
        R = const(f"R{l}", rng.uniform(-0.5, 0.5, (dirs, G * H, H)))
        B = const(f"B{l}", rng.uniform(-0.3, 0.3, (dirs, 2 * G * H)))
        for name in ("h0", "c0") if op == "LSTM" else ("h0",):
            nodes.append(helper.make_node(
                "Slice", [name, ints(f"s{l}{name}", [l * dirs]), ints(f"e{l}{name}", [(l + 1) * dirs]),
                          ints(f"a{l}{name}", [0])], [f"{name}_{l}"], name=f"slice_{name}_{l}"))
        inputs = [cur, W, R, B, "", f"h0_{l}"]
        if op == "LSTM":
            inputs.append(f"c0_{l}")
            if peephole:
                inputs.append(const(f"P{l}", rng.uniform(-0.5, 0.5, (dirs, 3 * H))))
        outputs = [f"Y{l}", f"Yh{l}"] + ([f"Yc{l}"] if op == "LSTM" else [])
        attrs = dict(hidden_size=H, direction=direction, **(extra_attrs or {}))
        if op == "GRU":
            attrs["linear_before_reset"] = linear_before_reset
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op.lower()}_{l}", **attrs))
        if dirs == 1:  # Y (T, 1, B, H) -> (T, B, H)
            nodes.append(helper.make_node("Squeeze", [f"Y{l}", ints(f"ax{l}", [1])], [f"Ys{l}"],
                                          name=f"squeeze_{l}"))
        else:  # (T, 2, B, H) -> (T, B, 2H)
            nodes.append(helper.make_node("Transpose", [f"Y{l}"], [f"Yt{l}"], perm=[0, 2, 1, 3],
                                          name=f"dirs_last_{l}"))
            nodes.append(helper.make_node("Reshape", [f"Yt{l}", ints(f"shape{l}", [0, 0, -1])],
                                          [f"Ys{l}"], name=f"merge_dirs_{l}"))
        hn.append(f"Yh{l}")
        if op == "LSTM":
            cn.append(f"Yc{l}")
        cur, width = f"Ys{l}", H * dirs
    nodes.append(helper.make_node("Transpose", [cur], ["seq"], perm=[1, 0, 2], name="to_batch_major"))
    nodes.append(helper.make_node("MatMul", ["seq", const("Wh", rng.uniform(-0.5, 0.5, (width, out)))],
                                  ["z"], name="head_matmul"))
    nodes.append(helper.make_node("Add", ["z", const("bh", rng.uniform(-0.5, 0.5, out))], ["y"],
                                  name="head_add"))
    nodes.append(helper.make_node("Concat", hn, ["hn"], axis=0, name="cat_h"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", out]),
               helper.make_tensor_value_info("hn", TensorProto.FLOAT, [layers * dirs, "b", H])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", features]),
              helper.make_tensor_value_info("h0", TensorProto.FLOAT, [layers * dirs, "b", H])]
    if op == "LSTM":
        nodes.append(helper.make_node("Concat", cn, ["cn"], axis=0, name="cat_c"))
        outputs.append(helper.make_tensor_value_info("cn", TensorProto.FLOAT, [layers * dirs, "b", H]))
        inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [layers * dirs, "b", H]))
    graph = helper.make_graph(nodes, "hand_built", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """model_file(kind, **kw) -> path, built once per distinct arguments."""
    cache = {}
    root = tmp_path_factory.mktemp("cell_models")

    def make(kind, **kw):
        key = (kind, repr(sorted(kw.items())))
        if key not in cache:
            path = root / f"m{len(cache)}.onnx"
            cache[key] = export_torch(path, **kw) if kind == "torch" else build_onnx(path, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def reference():
    """ONNX Runtime on a whole batch of sequences (the independent answer)."""
    return ort_reference
