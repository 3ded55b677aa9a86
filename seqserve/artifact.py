"""The ONNX artifact: the one contract between training and every runtime.

A served model is a single file, `REPO/NAME/VERSION/model.onnx`, that holds
its weights and everything a runtime or client needs as metadata_props whose
values are JSON. No side files.

Graph interface (fixed; see README "Bring your own model"):
  inputs   x   float32 (batch, time, features)   or int64 token ids (batch, time)
           h0  float32 (layers*directions, batch, hidden)
           c0  float32 (layers*directions, batch, hidden)       LSTM only
  outputs  y   float32 (batch, time, outputs)   per-step outputs in raw units
           hn  float32 (layers*directions, batch, hidden)
           cn  float32 (layers*directions, batch, hidden)       LSTM only
batch and time are dynamic; one ONNX LSTM/GRU/RNN node per layer.

Metadata keys (JSON values):
  seqserve_format  int, this module's FORMAT
  task             str  e.g. "sine", "sunspots", "sentiment3", "ner", "lm"
  cell             str  "rnn" | "lstm" | "gru"
  layers           int
  hidden           int
  directions       int  1 or 2
  input_kind       str  "float" | "tokens"
  input_features   int  features per step (float) or vocabulary size (tokens)
  output_kind      str  "regression" | "classify" | "tag" | "lm"
  output_size      int
  output_names     list[str]  series columns, class labels, tag names (or [] for lm)
  normalization    {"mean": [...], "std": [...]} | null   already inside the graph
  labels           list[str] | null
  vocab            list[str] | null   token id i is vocab[i]
  tokenizer        dict | null        settings for raw text (lowercase, unk, pad...)
  metrics          dict               training metrics
  source_run       str
  content_hash     str  sha256 of the graph (weights included), metadata excluded
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = 1
MODEL_FILE = "model.onnx"
DEFAULT_REPO = "model_repository"
CELL_OPS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}


class ArtifactError(ValueError):
    """A model file or repository entry that does not follow the convention."""


@dataclass
class ModelInfo:
    """Metadata of one model file, validated against the convention."""

    name: str
    version: int
    path: Path
    task: str
    cell: str
    layers: int
    hidden: int
    directions: int
    input_kind: str
    input_features: int
    output_kind: str
    output_size: int
    output_names: list = field(default_factory=list)
    normalization: dict | None = None
    labels: list | None = None
    vocab: list | None = None
    tokenizer: dict | None = None
    metrics: dict = field(default_factory=dict)
    source_run: str = ""
    content_hash: str = ""

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.has_cell_state else ("h",)

    @property
    def can_stream(self) -> bool:
        return self.directions == 1


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise ArtifactError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)"
        )
    return name


def content_hash(model_proto) -> str:
    """sha256 over the graph alone, so editing metadata never changes it."""
    return hashlib.sha256(model_proto.graph.SerializeToString(deterministic=True)).hexdigest()


def read_metadata(model_proto) -> dict:
    out = {}
    for prop in model_proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    return out


def write_metadata(model_proto, meta: dict) -> None:
    del model_proto.metadata_props[:]
    for key in sorted(meta):
        entry = model_proto.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(meta[key])


def versions(repo: str | os.PathLike, name: str) -> list[int]:
    """Versions of NAME in REPO that hold a model file, ascending."""
    base = Path(repo) / name
    if not base.is_dir():
        return []
    found = []
    for child in base.iterdir():
        if child.name.isdigit() and (child / MODEL_FILE).is_file():
            found.append(int(child.name))
    return sorted(found)


def list_models(repo: str | os.PathLike) -> dict[str, list[int]]:
    """{name: [versions]} for every model in the repository."""
    root = Path(repo)
    if not root.is_dir():
        return {}
    out = {}
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            vs = versions(root, child.name)
            if vs:
                out[child.name] = vs
    return out


def model_path(repo: str | os.PathLike, name: str, version: int | None = None) -> Path:
    """Path of NAME's model file: the given version, or the newest."""
    vs = versions(repo, name)
    if not vs:
        raise ArtifactError(f"no model named {name!r} in repository {str(repo)!r}")
    if version is None:
        version = vs[-1]
    if version not in vs:
        raise ArtifactError(f"model {name!r} has no version {version} (has {vs})")
    return Path(repo) / name / str(version) / MODEL_FILE


# ------------------------------------------------------------ loading and validation
# Works with onnx + json alone (no torch, no onnxruntime): the server calls it.

OUTPUT_KINDS = ("regression", "classify", "tag", "lm")
_FLOAT, _INT64 = 1, 7  # onnx.TensorProto.FLOAT / INT64
_DTYPE_NAMES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}
# ONNX defaults, which are also PyTorch's cells; anything else would make the
# Numba cell and ONNX Runtime compute different functions
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _dims(value_info) -> list:
    """Shape as a list of int (static) or str (symbolic / unknown)."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _check_tensor(value_info, rank: int, dtypes: tuple[int, ...], what: str) -> list:
    tt = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type"):
        raise ArtifactError(f"{what} {value_info.name!r} is not a tensor")
    if tt.elem_type not in dtypes:
        want = " or ".join(_DTYPE_NAMES[d] for d in dtypes)
        got = _DTYPE_NAMES.get(tt.elem_type, f"onnx type {tt.elem_type}")
        raise ArtifactError(f"{what} {value_info.name!r} has dtype {got}, expected {want}")
    dims = _dims(value_info)
    if tt.HasField("shape") and len(dims) != rank:
        raise ArtifactError(f"{what} {value_info.name!r} has rank {len(dims)} {dims}, expected rank {rank}")
    return dims if tt.HasField("shape") else ["?"] * rank


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            if isinstance(value, bytes):
                return value.decode()
            if isinstance(value, list):
                return [v.decode() if isinstance(v, bytes) else v for v in value]
            return value
    return default


def _recurrent_nodes(graph) -> tuple[str, list]:
    """(ONNX op type, nodes) of the recurrent layers, checked for one cell and one shape."""
    nodes = [n for n in graph.node if n.op_type in CELL_OPS]
    if not nodes:
        loops = [n.op_type for n in graph.node if n.op_type in ("Loop", "Scan")]
        hint = f" (found {loops[0]}: an unrolled or looped cell is not supported)" if loops else ""
        raise ArtifactError(f"no recurrent node (LSTM, GRU or RNN) in the graph{hint}")
    ops = sorted({n.op_type for n in nodes})
    if len(ops) > 1:
        raise ArtifactError(f"mixed recurrent cells {ops}: one cell type per model")
    op = ops[0]
    for n in nodes:
        direction = _attr(n, "direction", "forward")
        if direction not in ("forward", "bidirectional"):
            raise ArtifactError(f"{op} node {n.name!r} has direction {direction!r}: use forward or bidirectional")
        if _attr(n, "layout", 0) != 0:
            raise ArtifactError(f"{op} node {n.name!r} has layout=1: the convention is time-major (layout 0)")
        if _attr(n, "clip") is not None:
            raise ArtifactError(f"{op} node {n.name!r} sets clip: not supported")
        if _attr(n, "input_forget", 0):
            raise ArtifactError(f"{op} node {n.name!r} sets input_forget: not supported")
        acts = _attr(n, "activations")
        default = _DEFAULT_ACTIVATIONS[op]
        if acts is not None and [a.lower() for a in acts] != [a.lower() for a in default] * (len(acts) // len(default)):
            raise ArtifactError(f"{op} node {n.name!r} has activations {acts}: only the default {default} is supported")
        if _attr(n, "hidden_size") is None:
            raise ArtifactError(f"{op} node {n.name!r} has no hidden_size attribute")
        if op == "LSTM" and len(n.input) > 7 and n.input[7]:
            raise ArtifactError(f"LSTM node {n.name!r} has peephole weights (input P): not supported")
    for key in ("direction", "hidden_size"):
        values = {str(_attr(n, key, "forward")) for n in nodes}
        if len(values) > 1:
            raise ArtifactError(f"{op} nodes disagree on {key}: {sorted(values)}")
    return op, nodes


def _check_interface(graph) -> None:
    """Names, dtypes and ranks of the convention's tensors, before anything else,
    so a hand-edited interface is reported as such (not as a checker error)."""
    inits = {t.name for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in inits}
    outputs = {o.name: o for o in graph.output}
    for name in ("x", "h0"):
        if name not in inputs:
            raise ArtifactError(f"missing input {name!r}: the convention's inputs are x, h0 and, for LSTM, c0 "
                                f"(graph has {sorted(inputs)})")
    for name in ("y", "hn"):
        if name not in outputs:
            raise ArtifactError(f"missing output {name!r}: the convention's outputs are y, hn and, for LSTM, cn "
                                f"(graph has {sorted(outputs)})")
    if ("c0" in inputs) != ("cn" in outputs):
        missing = "c0" if "cn" in outputs else "cn"
        raise ArtifactError(f"missing {'input' if missing == 'c0' else 'output'} {missing!r}: "
                            "an LSTM model has both c0 and cn, other cells neither")
    x = inputs["x"]
    if x.type.tensor_type.elem_type == _INT64:
        _check_tensor(x, 2, (_INT64,), "input")
    else:
        _check_tensor(x, 3, (_FLOAT,), "input")
    for name in ("h0", "c0"):
        if name in inputs:
            _check_tensor(inputs[name], 3, (_FLOAT,), "input")
    _check_tensor(outputs["y"], 3, (_FLOAT,), "output")
    for name in ("hn", "cn"):
        if name in outputs:
            _check_tensor(outputs[name], 3, (_FLOAT,), "output")


def _infer_from_graph(proto) -> dict:
    """Everything the convention lets us read off the graph itself.

    Runs after _check_interface, which has already refused a missing x/h0/y/hn."""
    graph = proto.graph
    inits = {t.name: list(t.dims) for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in inits}
    outputs = {o.name: o for o in graph.output}
    op, nodes = _recurrent_nodes(graph)
    cell = CELL_OPS[op]
    want_in = ["x", "h0", "c0"] if cell == "lstm" else ["x", "h0"]
    want_out = ["y", "hn", "cn"] if cell == "lstm" else ["y", "hn"]
    for names, want, kind in ((inputs, want_in, "input"), (outputs, want_out, "output")):
        missing = [n for n in want if n not in names]
        if missing:
            raise ArtifactError(f"missing {kind} {missing[0]!r}, required for a {op} model")
        extra = sorted(set(names) - set(want))
        if extra:
            raise ArtifactError(f"unexpected {kind} {extra[0]!r}: a {op} model has {kind}s {want}")

    x = inputs["x"]
    x_type = x.type.tensor_type.elem_type
    if x_type == _INT64:
        x_dims = _check_tensor(x, 2, (_INT64,), "input")
        input_kind = "tokens"
    else:
        x_dims = _check_tensor(x, 3, (_FLOAT,), "input")
        input_kind = "float"
    state_dims = {n: _check_tensor(inputs[n], 3, (_FLOAT,), "input") for n in want_in[1:]}
    y_dims = _check_tensor(outputs["y"], 3, (_FLOAT,), "output")
    state_dims.update({n: _check_tensor(outputs[n], 3, (_FLOAT,), "output") for n in want_out[1:]})

    hidden = int(_attr(nodes[0], "hidden_size"))
    directions = 2 if _attr(nodes[0], "direction", "forward") == "bidirectional" else 1
    layers = len(nodes)
    for name, dims in state_dims.items():
        if isinstance(dims[0], int) and dims[0] != layers * directions:
            raise ArtifactError(f"{name!r} has {dims[0]} states on axis 0 but the graph has {layers} "
                                f"layer(s) x {directions} direction(s)")
        if isinstance(dims[2], int) and dims[2] != hidden:
            raise ArtifactError(f"{name!r} has hidden size {dims[2]} but the {op} nodes have hidden_size={hidden}")

    features = None
    if input_kind == "float":
        w = inits.get(nodes[0].input[1])
        features = x_dims[2] if isinstance(x_dims[2], int) else (w[2] if w and len(w) == 3 else None)
    else:  # token ids index an embedding: Gather(table, x)
        for n in graph.node:
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == "x" and n.input[0] in inits:
                features = inits[n.input[0]][0]
    out_size = y_dims[2] if isinstance(y_dims[2], int) else None
    return {"cell": cell, "layers": layers, "hidden": hidden, "directions": directions,
            "input_kind": input_kind, "input_features": features, "output_size": out_size}


def _check_metadata(meta: dict, graph_info: dict) -> dict:
    """Merge metadata over what the graph says; any disagreement is an error."""
    fmt = meta.get("seqserve_format", FORMAT)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise ArtifactError(f"seqserve_format {fmt!r} is not supported (this seqserve reads <= {FORMAT})")
    cell = meta.get("cell", graph_info["cell"])
    if cell not in CELL_OPS.values():
        raise ArtifactError(f"unknown cell {cell!r} in metadata: expected one of {sorted(CELL_OPS.values())}")
    merged = dict(graph_info)
    for key, found in graph_info.items():
        if key not in meta:
            continue
        if found is not None and meta[key] != found:
            raise ArtifactError(f"metadata says {key}={meta[key]!r} but the graph has {key}={found!r}")
        merged[key] = meta[key]
    for key in ("input_features", "output_size"):
        if not isinstance(merged[key], int) or merged[key] <= 0:
            raise ArtifactError(f"cannot tell {key} from the graph (give it a static size) or metadata")

    info = {
        "task": str(meta.get("task", "custom")),
        "output_kind": meta.get("output_kind", "regression"),
        "output_names": meta.get("output_names") or [],
        "normalization": meta.get("normalization"),
        "labels": meta.get("labels"),
        "vocab": meta.get("vocab"),
        "tokenizer": meta.get("tokenizer"),
        "metrics": meta.get("metrics") or {},
        "source_run": str(meta.get("source_run", "")),
    }
    if info["output_kind"] not in OUTPUT_KINDS:
        raise ArtifactError(f"unknown output_kind {info['output_kind']!r}: expected one of {list(OUTPUT_KINDS)}")
    names = info["output_names"]
    if not isinstance(names, list) or (names and len(names) != merged["output_size"]):
        raise ArtifactError(f"output_names has {len(names) if isinstance(names, list) else names!r} "
                            f"entries but output_size is {merged['output_size']}")
    norm = info["normalization"]
    if norm is not None:
        if not isinstance(norm, dict) or not {"mean", "std"} <= set(norm):
            raise ArtifactError("normalization must be {\"mean\": [...], \"std\": [...]}")
        if merged["input_kind"] != "float":
            raise ArtifactError("normalization given for a token-input model")
        n = merged["input_features"]
        if len(norm["mean"]) != n or len(norm["std"]) != n:
            raise ArtifactError(f"normalization has {len(norm['mean'])} means and {len(norm['std'])} stds "
                                f"for {n} input features")
    vocab = info["vocab"]
    if vocab is not None and (merged["input_kind"] != "tokens" or len(vocab) != merged["input_features"]):
        raise ArtifactError(f"vocab has {len(vocab)} entries but the model reads "
                            f"{merged['input_kind']} input of size {merged['input_features']}")
    merged.update(info)
    return merged


def inspect_model(proto, path: str | os.PathLike = "", name: str | None = None,
                  version: int | None = None) -> ModelInfo:
    """Validate a loaded ModelProto against the convention -> ModelInfo."""
    import onnx

    where = str(path) or "model"
    try:
        _check_interface(proto.graph)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"fails onnx.checker: {first}") from None
        for n in proto.graph.node:
            if n.domain not in ("", "ai.onnx"):
                raise ArtifactError(f"node {n.name!r} uses op {n.domain}.{n.op_type}: only standard ONNX ops")
        fields = _check_metadata(read_metadata(proto), _infer_from_graph(proto))
        digest = content_hash(proto)
        stored = read_metadata(proto).get("content_hash")
        if stored and stored != digest:
            raise ArtifactError("content_hash does not match the graph: the graph was edited after export")
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {exc}") from None
    p = Path(path) if path else Path(MODEL_FILE)
    if version is None:
        version = int(p.parent.name) if p.parent.name.isdigit() else 0
    if name is None:
        name = p.parent.parent.name if p.parent.name.isdigit() else p.stem
    fields["content_hash"] = digest
    return ModelInfo(name=name, version=version, path=p, **fields)


def load_model_info(path: str | os.PathLike, name: str | None = None,
                    version: int | None = None) -> ModelInfo:
    """Read and validate a model file; ArtifactError names what is wrong.

    A file with no seqserve metadata (bring your own model) is read from its
    graph: task "custom", output_kind "regression", no normalisation.
    NAME and VERSION default to the repository layout REPO/NAME/VERSION/model.onnx.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such model file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends: any unreadable file
        raise ArtifactError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    return inspect_model(proto, path, name, version)
