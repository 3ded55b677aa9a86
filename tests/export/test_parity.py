"""Exported graphs answer like PyTorch: every cell, 1-3 layers, both directions.

The reference here is the PyTorch SequenceModel run directly (normalisation
applied by hand), and ONNX Runtime is called directly: the test does not rely
on check_parity to judge check_parity's own export.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training import export

TOL = 1e-5
CELL_OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def reference(model, ckpt, x, states):
    """PyTorch answer in raw units; x raw float or int64 ids."""
    xt = torch.from_numpy(x)
    norm = ckpt.normalization
    if norm is not None:
        xt = (xt - torch.tensor(norm["mean"])) / torch.tensor(norm["std"])
    hs = [torch.from_numpy(s) for s in states]
    with torch.no_grad():
        y, st = model(xt, tuple(hs) if len(hs) == 2 else hs[0])
    if norm is not None:
        y = y * torch.tensor(norm["std"]) + torch.tensor(norm["mean"])
    st = st if isinstance(st, tuple) else (st,)
    return y.numpy(), [s.numpy() for s in st]


def model_units(diff_y, ckpt):
    # float32 spacing at |y|~120 is ~8e-6, so compare y in the model's own units
    norm = ckpt.normalization
    return diff_y / np.float64(norm["std"]) if norm is not None else diff_y


@pytest.mark.parametrize("tokens", [False, True], ids=["float", "tokens"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_export_matches_pytorch(new_model, parity_log, cell, layers, bidirectional, tokens):
    model, ckpt = new_model(cell=cell, layers=layers, bidirectional=bidirectional, tokens=tokens,
                            seed=layers)
    proto = export.build_onnx(model, ckpt)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count(CELL_OP[cell]) == layers, ops
    assert not {"Loop", "Scan"} & set(ops)
    if tokens:
        assert ops[0] == "Gather" and list(proto.graph.node[0].input)[1] == "x"

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    assert in_names == (["x", "h0", "c0"] if cell == "lstm" else ["x", "h0"])
    assert [o.name for o in sess.get_outputs()] == (["y", "hn", "cn"] if cell == "lstm" else ["y", "hn"])
    rng = np.random.default_rng(layers)
    n_states = layers * (2 if bidirectional else 1)
    # batch/time pairs: none equals the traced example (2, 5); T=300 is a long rollout
    for batch, time in [(1, 1), (3, 7), (8, 3), (2, 300)]:
        if tokens:
            x = rng.integers(0, 40, size=(batch, time), dtype=np.int64)
        else:
            x = (rng.standard_normal((batch, time, 2)) * [40.0, 0.25] + [120.0, -0.5]).astype(np.float32)
        states = [(0.5 * rng.standard_normal((n_states, batch, 8))).astype(np.float32)
                  for _ in in_names[1:]]
        got = sess.run(None, dict(zip(in_names, [x, *states])))
        want_y, want_states = reference(model, ckpt, x, states)
        assert got[0].shape == want_y.shape
        err = model_units(np.abs(got[0].astype(np.float64) - want_y), ckpt).max()
        for g, w in zip(got[1:], want_states):
            err = max(err, np.abs(g - w).max())
        case = f"layers={layers} {'bi' if bidirectional else 'uni'} {'tokens' if tokens else 'float'} batch={batch} T={time}"
        parity_log(cell, err, case)
        assert err <= TOL, f"{case}: max-abs {err:.3e}"

    report = export.check_parity(model, proto, ckpt.normalization)
    assert report["passed"], report
    assert ("chained 12x T=1" in report["checks"]) == (not bidirectional)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_chained_steps_equal_one_call(new_model, cell):
    """k calls of T=1 carrying hn/cn forward == one PyTorch call of T=k (the streaming contract)."""
    model, ckpt = new_model(cell=cell, layers=2)
    sess = ort.InferenceSession(export.build_onnx(model, ckpt).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 9, 2)) * 10 + 100).astype(np.float32)
    start = [rng.standard_normal((2, 4, 8)).astype(np.float32) for _ in names[1:]]
    want_y, want_states = reference(model, ckpt, x, start)
    states, ys = start, []
    for t in range(9):
        out = sess.run(None, dict(zip(names, [x[:, t:t + 1], *states])))
        ys.append(out[0])
        states = out[1:]
    step_y = np.concatenate(ys, axis=1)
    assert np.abs(model_units(step_y.astype(np.float64) - want_y, ckpt)).max() <= TOL
    for got, want in zip(states, want_states):
        assert np.abs(got - want).max() <= TOL


def test_normalisation_is_constant_affine_steps(new_model):
    """Sub/Div with (features,) constants before the first cell, Mul/Add after the head."""
    model, ckpt = new_model(cell="gru", layers=2)
    proto = export.build_onnx(model, ckpt)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type != "Constant"]
    first_cell = next(i for i, n in enumerate(nodes) if n.op_type == "GRU")
    pre = [n for n in nodes[:first_cell] if n.op_type in ("Sub", "Div", "Mul", "Add")]
    assert [n.op_type for n in pre] == ["Sub", "Div"]
    assert pre[0].input[0] == "x"
    np.testing.assert_array_equal(inits[pre[0].input[1]], np.float32(ckpt.normalization["mean"]))
    np.testing.assert_array_equal(inits[pre[1].input[1]], np.float32(ckpt.normalization["std"]))
    tail = [n.op_type for n in nodes[-4:]]
    assert tail == ["MatMul", "Add", "Mul", "Add"] and nodes[-1].output[0] == "y"
    np.testing.assert_array_equal(inits[nodes[-2].input[1]], np.float32(ckpt.normalization["std"]))
    np.testing.assert_array_equal(inits[nodes[-1].input[1]], np.float32(ckpt.normalization["mean"]))


def test_dynamo_exporter_is_not_used(new_model):
    """The file has symbolic batch/time on x and y (the dynamo exporter freezes RNN time)."""
    model, ckpt = new_model(cell="rnn", layers=1)
    proto = export.build_onnx(model, ckpt)
    for vi in (proto.graph.input[0], proto.graph.output[0]):
        dims = vi.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims[:2]] == ["batch", "time"]
        assert dims[2].dim_value == 2


def test_gate_units_scale_unbounded_values_only():
    """y logits and the LSTM cell state are compared relative to max(1, max|value|);
    hn (bounded by 1) raw, so a real hn mismatch still fails the gate."""
    want = {"y": np.array([[30.0, -2.0]]), "hn": np.array([0.9, -0.5]), "cn": np.array([18.0, 0.5])}
    got = {"y": want["y"] + 3e-5, "hn": want["hn"].copy(), "cn": want["cn"] + 3e-5}
    err, raw = export._max_err(got, want, scale=None)
    assert raw == pytest.approx(3e-5) and err == pytest.approx(3e-5 / 18.0)  # cn: / max|cn|
    got["hn"] = want["hn"] + 3e-5
    err, _ = export._max_err(got, want, scale=None)
    assert err == pytest.approx(3e-5) and err > export.PARITY_TOL
