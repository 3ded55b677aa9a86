"""Read a streaming cell's weights from its ONNX file (the single source of truth).

The graph must be x -> [Gather embedding] -> [constant affine steps] -> one
LSTM/GRU/RNN node per layer -> head (MatMul+Add or Gemm) -> [constant affine
steps, at most one activation] -> y. Layout plumbing that the legacy torch
exporter inserts (Transpose, Squeeze, Slice of h0 per layer, Concat of hn, ...)
is allowed anywhere because it moves values without changing them. Anything
else on the data path is refused with the node's name and the reason, so a
graph we cannot stream fails at load, never with wrong numbers.

Weights stay in ONNX gate order (LSTM i,o,f,c; GRU z,r,h); numpy only, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper


class CellError(ValueError):
    """A graph the cell cannot stream, or a call with bad arguments."""


RECURRENT = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
# ops that only move or relabel values (layout, dtype, per-layer state plumbing)
PLUMBING = {"Transpose", "Squeeze", "Unsqueeze", "Reshape", "Identity", "Cast", "Dropout",
            "Flatten", "Expand"}
AFFINE = {"Add", "Sub", "Mul", "Div"}
# head activation codes shared with the kernels
ACTIVATIONS = {"Sigmoid": 1, "Tanh": 2, "Relu": 3, "Softmax": 4, "LogSoftmax": 5}
DEFAULT_ACTS = {"lstm": ["Sigmoid", "Tanh", "Tanh"], "gru": ["Sigmoid", "Tanh"], "rnn": ["Tanh"]}


@dataclass
class Layer:
    """One recurrent node, ONNX layouts without the direction axis."""

    W: np.ndarray  # (G*H, in)
    R: np.ndarray  # (G*H, H)
    Wb: np.ndarray  # (G*H,)
    Rb: np.ndarray  # (G*H,)
    P: np.ndarray | None = None  # (3H,) LSTM peepholes i, o, f
    linear_before_reset: int = 0  # GRU only
    node: str = ""


@dataclass
class CellSpec:
    """What load_cell needs to stream a model, parsed from the ONNX graph alone."""

    cell: str
    layers: int
    hidden: int
    input_kind: str  # "float" | "tokens"
    input_features: int  # features per step, or vocabulary size for tokens
    output_size: int
    layer_weights: list = field(default_factory=list, repr=False)
    embedding: np.ndarray | None = field(default=None, repr=False)  # (V, E)
    in_scale: np.ndarray | None = field(default=None, repr=False)  # (F,) x*scale+shift
    in_shift: np.ndarray | None = field(default=None, repr=False)
    head_W: np.ndarray | None = field(default=None, repr=False)  # (out, H)
    head_b: np.ndarray | None = field(default=None, repr=False)  # (out,)
    activation: str | None = None
    out_scale: np.ndarray | None = field(default=None, repr=False)  # (out,) applied after activation
    out_shift: np.ndarray | None = field(default=None, repr=False)
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    @property
    def core_input(self) -> int:
        """Width of the first layer's input (embedding width for tokens)."""
        return self.layer_weights[0].W.shape[1]

    @property
    def has_peepholes(self) -> bool:
        return any(lw.P is not None for lw in self.layer_weights)


class _Graph:
    """Constant folding helpers over one ONNX graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.const[node.output[0]] = numpy_helper.to_array(attr.t)
                    elif attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                        self.const[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attr))

    def is_const(self, name: str) -> bool:
        return name in self.const

    def data_inputs(self, node) -> list[str]:
        return [i for i in node.input if i and not self.is_const(i)]

    def trace_back(self, name: str, stops: set[str]) -> tuple[list, str]:
        """Nodes from a stop name to `name` (forward order) along single data inputs."""
        chain = []
        while name not in stops:
            node = self.producer.get(name)
            if node is None:
                raise CellError(f"tensor {name!r} does not come from the model input or a recurrent layer")
            if node.op_type in PLUMBING:
                nxt = node.input[0]
            elif node.op_type == "Gather" and self.is_const(node.input[0]):
                nxt = node.input[1]  # embedding lookup: constant table, data indices
            else:
                data = self.data_inputs(node)
                if len(data) != 1:
                    raise CellError(f"node {node.name!r} ({node.op_type}) mixes {len(data)} data inputs "
                                    f"on the streaming path: cannot stream")
                nxt = data[0]
            chain.append(node)
            name = nxt
        return chain[::-1], name


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _vector(value: np.ndarray, width: int, node) -> np.ndarray:
    """A constant that broadcasts over the feature (last) axis only -> (width,)."""
    v = np.asarray(value, dtype=np.float32)
    if v.size not in (1, width) or (v.ndim > 0 and v.size == width and v.shape[-1] != width):
        raise CellError(f"node {node.name!r} ({node.op_type}): constant of shape {list(v.shape)} "
                        f"does not broadcast over the {width} features: cannot fold it")
    return np.broadcast_to(v.reshape(-1), (width,)).astype(np.float32)


def _fold_affine(g: _Graph, node, scale: np.ndarray, shift: np.ndarray, data_name: str):
    """Compose y = (x*scale + shift) with one constant Add/Sub/Mul/Div node."""
    a, b = node.input[0], node.input[1]
    data_first = a == data_name
    k = _vector(g.const[b if data_first else a], scale.shape[0], node)
    op = node.op_type
    if op == "Add":
        return scale, shift + k
    if op == "Mul":
        return scale * k, shift * k
    if op == "Sub":
        return (scale, shift - k) if data_first else (-scale, k - shift)
    if not data_first:  # Div: const / x is not affine
        raise CellError(f"node {node.name!r}: Div of a constant by the data is not affine: cannot fold it")
    return scale / k, shift / k


def _check_recurrent(node, g: _Graph, cell: str) -> dict:
    a = _attrs(node)
    where = f"node {node.name!r} ({node.op_type})"
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction != "forward":
        raise CellError(f"{where}: direction={direction!r} cannot stream (it reads the future); "
                        f"serve it with whole sequences instead")
    acts = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", [])]
    if acts and [s.lower() for s in acts] != [s.lower() for s in DEFAULT_ACTS[cell]]:
        raise CellError(f"{where}: activations {acts} are not supported (only {DEFAULT_ACTS[cell]})")
    for key in ("activation_alpha", "activation_beta"):
        if a.get(key):
            raise CellError(f"{where}: attribute {key} is not supported")
    if "clip" in a:
        raise CellError(f"{where}: cell clipping (clip={a['clip']}) is not supported")
    if a.get("input_forget", 0):
        raise CellError(f"{where}: input_forget=1 (coupled gates) is not supported")
    if a.get("layout", 0) != 0:
        raise CellError(f"{where}: layout={a['layout']} is not supported (only time-major 0)")
    if len(node.input) > 4 and node.input[4]:
        raise CellError(f"{where}: sequence_lens is not supported when streaming")
    for i in (1, 2):
        if not g.is_const(node.input[i]):
            raise CellError(f"{where}: weight input {node.input[i]!r} is not a constant")
    return a


def _layer(node, g: _Graph, cell: str) -> Layer:
    a = _check_recurrent(node, g, cell)
    W = g.const[node.input[1]].astype(np.float32)  # (dirs, G*H, in)
    R = g.const[node.input[2]].astype(np.float32)  # (dirs, G*H, H)
    if W.shape[0] != 1:
        raise CellError(f"node {node.name!r}: {W.shape[0]} directions cannot stream")
    gh, hidden = R.shape[1], R.shape[2]
    if gh != GATES[cell] * hidden or a.get("hidden_size", hidden) != hidden:
        raise CellError(f"node {node.name!r}: weights of shape {list(R.shape)} do not match "
                        f"hidden_size={a.get('hidden_size')}")
    if len(node.input) > 3 and node.input[3]:
        if not g.is_const(node.input[3]):
            raise CellError(f"node {node.name!r}: bias {node.input[3]!r} is not a constant")
        B = g.const[node.input[3]].astype(np.float32).reshape(-1)  # [Wb, Rb]
    else:
        B = np.zeros(2 * gh, np.float32)
    P = None
    if cell == "lstm" and len(node.input) > 7 and node.input[7]:
        if not g.is_const(node.input[7]):
            raise CellError(f"node {node.name!r}: peepholes {node.input[7]!r} are not a constant")
        P = g.const[node.input[7]].astype(np.float32).reshape(-1)  # (3H,) i, o, f
    return Layer(W=np.ascontiguousarray(W[0]), R=np.ascontiguousarray(R[0]),
                 Wb=B[:gh].copy(), Rb=B[gh:].copy(), P=P,
                 linear_before_reset=int(a.get("linear_before_reset", 0)), node=node.name)


def _check_state_slice(g: _Graph, node, name: str, layer: int, state_inputs: list) -> None:
    """Layer k must start from row k of the graph's h0/c0 (the slot's layer k).

    Follows Slice/Gather/Split and layout ops back to a graph input; a constant
    row index that is not k is refused. Anything it cannot read is let through:
    the parity tests, not this check, are the proof.
    """
    seen_index = None
    while name not in state_inputs:
        src = g.producer.get(name)
        if src is None:
            return  # a constant or unknown source: nothing to check
        if src.op_type == "Slice" and len(src.input) > 1 and g.is_const(src.input[1]):
            axes = g.const.get(src.input[3]) if len(src.input) > 3 and src.input[3] else None
            if axes is None or int(np.asarray(axes).reshape(-1)[0]) == 0:
                seen_index = int(np.asarray(g.const[src.input[1]]).reshape(-1)[0])
        elif src.op_type == "Gather" and g.is_const(src.input[1]) and _attrs(src).get("axis", 0) == 0:
            seen_index = int(np.asarray(g.const[src.input[1]]).reshape(-1)[0])
        elif src.op_type == "Split" and _attrs(src).get("axis", 0) == 0:
            seen_index = list(src.output).index(name)
        elif src.op_type not in PLUMBING:
            return
        name = src.input[0]
    if seen_index is not None and seen_index != layer:
        raise CellError(f"node {node.name!r}: layer {layer} starts from row {seen_index} of the "
                        f"state input {name!r}; the cell keeps layer k's state in row k")


def _pre_core(g: _Graph, chain: list, x_name: str, features: int, spec: CellSpec) -> None:
    """Embedding and input normalisation between x and the first recurrent node."""
    scale = shift = None
    data = x_name
    for node in chain:
        op = node.op_type
        if op == "Gather" and g.is_const(node.input[0]):
            if spec.embedding is not None or scale is not None:
                raise CellError(f"node {node.name!r}: Gather after the input was already transformed")
            spec.embedding = g.const[node.input[0]].astype(np.float32)
            if spec.embedding.ndim != 2:
                raise CellError(f"node {node.name!r}: embedding table of shape {list(spec.embedding.shape)}")
        elif op in AFFINE:
            width = spec.embedding.shape[1] if spec.embedding is not None else features
            if scale is None:
                scale, shift = np.ones(width, np.float32), np.zeros(width, np.float32)
            scale, shift = _fold_affine(g, node, scale, shift, data)
        elif op not in PLUMBING:
            raise CellError(f"node {node.name!r} ({op}) between the input and the first recurrent "
                            f"layer is not supported")
        data = node.output[0]
    if spec.embedding is not None and scale is not None:
        spec.embedding = spec.embedding * scale + shift  # fold into the table
    elif scale is not None:
        spec.in_scale, spec.in_shift = scale.astype(np.float32), shift.astype(np.float32)


def _post_core(g: _Graph, chain: list, y_name: str, hidden: int, spec: CellSpec) -> None:
    """Head, its activation, and output de-normalisation after the last layer."""
    W = b = None
    out_scale = out_shift = None
    data = y_name
    for node in chain:
        op = node.op_type
        a = _attrs(node)
        if op in PLUMBING:
            pass
        elif W is None and op == "MatMul":
            if not g.is_const(node.input[1]):
                raise CellError(f"node {node.name!r}: head MatMul weight is not a constant")
            m = g.const[node.input[1]].astype(np.float32)  # (H, out)
            W, b = np.ascontiguousarray(m.T), np.zeros(m.shape[1], np.float32)
        elif W is None and op == "Gemm":
            if a.get("transA", 0) or not g.is_const(node.input[1]):
                raise CellError(f"node {node.name!r}: Gemm with transA or a non-constant weight")
            m = g.const[node.input[1]].astype(np.float32)
            m = m if a.get("transB", 0) else m.T  # -> (out, H)
            W = np.ascontiguousarray(m * np.float32(a.get("alpha", 1.0)))
            b = np.zeros(W.shape[0], np.float32)
            if len(node.input) > 2 and node.input[2]:
                b = _vector(g.const[node.input[2]], W.shape[0], node) * np.float32(a.get("beta", 1.0))
        elif W is None:
            raise CellError(f"node {node.name!r} ({op}) between the last recurrent layer and the head "
                            f"is not supported")
        elif op in AFFINE and spec.activation is None:
            # before any activation: fold straight into the head, z*s+t = (s*W)h + (s*b+t)
            s, t = _fold_affine(g, node, np.ones(W.shape[0], np.float32), np.zeros(W.shape[0], np.float32), data)
            W, b = W * s[:, None], b * s + t
        elif op in AFFINE:
            if out_scale is None:
                out_scale, out_shift = np.ones(W.shape[0], np.float32), np.zeros(W.shape[0], np.float32)
            out_scale, out_shift = _fold_affine(g, node, out_scale, out_shift, data)
        elif op in ACTIVATIONS and spec.activation is None:
            axis = a.get("axis", -1)
            if op in ("Softmax", "LogSoftmax") and axis not in (-1, 2):
                raise CellError(f"node {node.name!r}: {op} over axis {axis} is not the output axis")
            spec.activation = op
        else:
            raise CellError(f"node {node.name!r} ({op}) after the head is not supported")
        data = node.output[0]
    if W is None:
        raise CellError("no head (MatMul or Gemm) between the last recurrent layer and the output")
    if W.shape[1] != hidden:
        raise CellError(f"head weight of shape {list(W.shape)} does not read {hidden} hidden units")
    spec.head_W, spec.head_b = W.astype(np.float32), b.astype(np.float32)
    spec.out_scale, spec.out_shift = out_scale, out_shift


def _io_name(items, wanted: str) -> str:
    names = [v.name for v in items]
    return wanted if wanted in names else names[0]


def parse_model(model: onnx.ModelProto) -> CellSpec:
    """ModelProto -> CellSpec, or CellError naming the node the cell cannot stream."""
    from seqserve.artifact import read_metadata  # the artifact contract: reads metadata only

    g = _Graph(model.graph)
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initializers]
    if not graph_inputs or not model.graph.output:
        raise CellError("the graph has no inputs or outputs")
    x_name = _io_name(graph_inputs, "x")
    y_name = _io_name(model.graph.output, "y")

    nodes = [n for n in model.graph.node if n.op_type in RECURRENT]
    if not nodes:
        raise CellError("no LSTM, GRU or RNN node in the graph: nothing to stream")
    kinds = {RECURRENT[n.op_type] for n in nodes}
    if len(kinds) > 1:
        raise CellError(f"mixed recurrent node types {sorted(kinds)} are not supported")
    cell = kinds.pop()
    for n in nodes:
        if n.op_type in RECURRENT and n.domain not in ("", "ai.onnx"):
            raise CellError(f"node {n.name!r}: custom domain {n.domain!r}")

    # order the layers by following the data: each layer's X comes from the previous Y
    by_y = {n.output[0]: n for n in nodes if n.output and n.output[0]}
    stops = set(by_y) | {x_name}
    layers_in_order, seen = [], set()
    out_chain, last = g.trace_back(y_name, stops)
    if last == x_name:
        raise CellError("the output does not depend on any recurrent layer")
    node = by_y[last]
    while True:
        if node.name in seen:
            raise CellError(f"node {node.name!r}: recurrent layers form a cycle")
        seen.add(node.name)
        layers_in_order.append(node)
        chain, src = g.trace_back(node.input[0], stops)
        for n in chain:
            if n.op_type not in PLUMBING and src != x_name:
                raise CellError(f"node {n.name!r} ({n.op_type}) between recurrent layers "
                                f"{by_y[src].name!r} and {node.name!r} is not supported")
        if src == x_name:
            pre_chain = chain
            break
        node = by_y[src]
    layers_in_order.reverse()
    if len(layers_in_order) != len(nodes):
        unused = sorted({n.name for n in nodes} - seen)
        raise CellError(f"recurrent nodes {unused} are not on the path from x to y "
                        f"(parallel or bidirectional stacks cannot stream)")

    weights = [_layer(n, g, cell) for n in layers_in_order]
    state_inputs = [v.name for v in graph_inputs if v.name != x_name]
    for k, n in enumerate(layers_in_order):
        for pos in (5, 6) if cell == "lstm" else (5,):
            if len(n.input) > pos and n.input[pos]:
                _check_state_slice(g, n, n.input[pos], k, state_inputs)
    hidden = weights[0].R.shape[1]
    for lw, n in zip(weights, layers_in_order):
        if lw.R.shape[1] != hidden:
            raise CellError(f"node {n.name!r}: hidden size {lw.R.shape[1]} differs from {hidden}")
    for lw, n in zip(weights[1:], layers_in_order[1:]):
        if lw.W.shape[1] != hidden:
            raise CellError(f"node {n.name!r}: reads {lw.W.shape[1]} inputs, previous layer gives {hidden}")

    x_info = next(v for v in graph_inputs if v.name == x_name)
    elem = x_info.type.tensor_type.elem_type
    token_input = elem in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    spec = CellSpec(cell=cell, layers=len(weights), hidden=hidden,
                    input_kind="tokens" if token_input else "float",
                    input_features=weights[0].W.shape[1], output_size=0,
                    layer_weights=weights, metadata=read_metadata(model))
    _pre_core(g, pre_chain, x_name, weights[0].W.shape[1], spec)
    if token_input != (spec.embedding is not None):
        raise CellError("token-id input needs an embedding Gather before the first layer (and float input none)")
    if spec.embedding is not None:
        if spec.embedding.shape[1] != weights[0].W.shape[1]:
            raise CellError(f"embedding width {spec.embedding.shape[1]} != first layer input "
                            f"{weights[0].W.shape[1]}")
        spec.input_features = spec.embedding.shape[0]
    _post_core(g, out_chain, layers_in_order[-1].output[0], hidden, spec)
    spec.output_size = spec.head_W.shape[0]
    return spec


def load_spec(path) -> CellSpec:
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # OSError, or protobuf's DecodeError (no common public base)
        raise CellError(f"cannot read ONNX file {str(path)!r}: {exc}") from exc
    return parse_model(model)
