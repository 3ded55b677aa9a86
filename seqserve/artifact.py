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
