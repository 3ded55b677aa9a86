"""`seqserve export RUN_DIR`: a run folder -> a parity-gated, versioned ONNX file.

The graph follows the convention in seqserve/artifact.py and docs/MODEL_FORMAT.md:
(x, h0[, c0]) -> (y, hn[, cn]), batch and time dynamic, one ONNX LSTM/GRU/RNN
node per layer. We use the legacy TorchScript exporter on purpose: the dynamo
exporter unrolls nn.RNN and freezes the time axis (see FACTS.md).

Forecasting normalisation is baked into the graph as constant elementwise
steps, so clients and runtimes speak raw units:
    x -> Sub(mean) -> Div(std) -> recurrent layers -> MatMul+Add (head) -> Mul(std) -> Add(mean) -> y

Nothing reaches the repository unless ONNX Runtime matches PyTorch (the gate),
and the file appears there by one rename of a finished folder.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from seqserve import artifact
from training.model import Checkpoint, SequenceModel, load_checkpoint

OPSET = 17
IR_VERSION = 8  # what the legacy exporter stamps at opset 17; ORT 1.31 reads up to 13
PARITY_TOL = 1e-5
EXAMPLE_BATCH, EXAMPLE_TIME = 2, 5  # the traced example; the gate avoids these sizes
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"


class ParityError(ValueError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance; nothing was written."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class _GraphModule(nn.Module):
    """SequenceModel with the convention's flat signature and raw-unit I/O.

    mean/std are buffers so the exporter writes them as (features,) initializers
    consumed by plain Sub/Div (input) and Mul/Add (output) nodes.
    """

    def __init__(self, model: SequenceModel, normalization: dict | None):
        super().__init__()
        self.model = model
        self.lstm = model.config.cell == "lstm"
        self.normalize = normalization is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(normalization["mean"], dtype=torch.float32))
            self.register_buffer("std", torch.tensor(normalization["std"], dtype=torch.float32))

    def forward(self, x, h0, c0=None):
        if self.normalize:
            x = (x - self.mean) / self.std  # (B, T, F), raw -> model units
        state = (h0, c0) if self.lstm else h0
        y, state = self.model(x, state)  # (B, T, out)
        if self.normalize:
            y = y * self.std + self.mean  # model units -> raw
        if self.lstm:
            return y, state[0], state[1]
        return y, state


def _check_normalization(model: SequenceModel, normalization: dict | None) -> dict | None:
    if normalization is None:
        return None
    c = model.config
    mean, std = list(map(float, normalization["mean"])), list(map(float, normalization["std"]))
    if c.token_input:
        raise ValueError("normalization given for a token-input model")
    if len(mean) != c.input_size or len(std) != c.input_size:
        raise ValueError(f"normalization has {len(mean)} means and {len(std)} stds "
                         f"but the model reads {c.input_size} features")
    if c.head != "regression" or c.output_size != c.input_size:
        # y is de-normalised with the same statistics, so outputs must be the input columns
        raise ValueError(f"normalization needs a regression head with {c.input_size} outputs "
                         f"(one per input feature), got head={c.head} output_size={c.output_size}")
    if min(std) <= 0:
        raise ValueError("normalization std must be positive")
    return {"mean": mean, "std": std}


def _json_safe(value):
    """numpy scalars/arrays and tuples -> plain JSON values."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def build_metadata(model: SequenceModel, ckpt: Checkpoint, source_run: str = "") -> dict:
    c = model.config
    extra = ckpt.extra or {}
    labels = extra.get("labels")
    names = extra.get("output_names")
    if names is None:
        if c.head in ("classify", "tag") and labels is not None:
            names = labels
        elif c.head == "regression":
            names = (extra.get("columns") or (ckpt.task or {}).get("columns")
                     or [f"y{i}" for i in range(c.output_size)])
        else:
            names = []
    return _json_safe({
        "seqserve_format": artifact.FORMAT,
        "task": (ckpt.task or {}).get("name", "custom"),
        "cell": c.cell,
        "layers": c.layers,
        "hidden": c.hidden,
        "directions": c.directions,
        "input_kind": "tokens" if c.token_input else "float",
        "input_features": c.vocab_size if c.token_input else c.input_size,
        "output_kind": c.head,
        "output_size": c.output_size,
        "output_names": list(names),
        "normalization": _check_normalization(model, ckpt.normalization),
        "labels": labels,
        "vocab": extra.get("vocab"),
        "tokenizer": extra.get("tokenizer"),
        "metrics": ckpt.metrics or {},
        "source_run": source_run,
    })


def example_inputs(model: SequenceModel, batch: int, time: int, normalization=None,
                   zero_state=False, seed=0) -> dict[str, np.ndarray]:
    """Random inputs named by the convention; float x in raw units."""
    rng = np.random.default_rng(seed)
    c = model.config
    if c.token_input:
        x = rng.integers(0, c.vocab_size, size=(batch, time), dtype=np.int64)
    else:
        x = rng.standard_normal((batch, time, c.input_size)).astype(np.float32)
        if normalization is not None:
            x = (x * np.float32(normalization["std"]) + np.float32(normalization["mean"])).astype(np.float32)
    n, h = model.state_shape
    feeds = {"x": x}
    for name in (("h0", "c0") if c.cell == "lstm" else ("h0",)):
        s = np.zeros((n, batch, h), np.float32) if zero_state else \
            (0.5 * rng.standard_normal((n, batch, h))).astype(np.float32)
        feeds[name] = s
    return feeds


def build_onnx(model: SequenceModel, ckpt: Checkpoint, source_run: str = "") -> onnx.ModelProto:
    """Trace the model with the legacy exporter and stamp metadata + content hash."""
    model = model.cpu().eval()
    meta = build_metadata(model, ckpt, source_run)
    wrapper = _GraphModule(model, meta["normalization"]).eval()
    feeds = example_inputs(model, EXAMPLE_BATCH, EXAMPLE_TIME, meta["normalization"])
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    inputs = list(feeds)
    outputs = ["y", "hn", "cn"][: len(inputs)]
    axes = {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}}
    axes.update({name: {1: "batch"} for name in inputs[1:] + outputs[1:]})
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the legacy exporter's deprecation and batch-size warnings do not apply:
        # the gate checks other batch sizes and lengths explicitly
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, buf, dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, IR_VERSION) or IR_VERSION
    proto.producer_name = "seqserve"
    meta["content_hash"] = artifact.content_hash(proto)
    artifact.write_metadata(proto, meta)
    artifact.inspect_model(proto)  # onnx.checker + the loader's convention checks, as a server will run them
    return proto


# ---------------------------------------------------------------- parity gate

def _torch_reference(model: SequenceModel, feeds: dict, normalization) -> dict[str, np.ndarray]:
    """The independent answer: the PyTorch model, normalisation applied outside the graph."""
    x = torch.from_numpy(feeds["x"])
    if normalization is not None:
        x = (x - torch.tensor(normalization["mean"])) / torch.tensor(normalization["std"])
    h0 = torch.from_numpy(feeds["h0"])
    state = (h0, torch.from_numpy(feeds["c0"])) if "c0" in feeds else h0
    with torch.no_grad():
        y, state = model(x, state)
    if normalization is not None:
        y = y * torch.tensor(normalization["std"]) + torch.tensor(normalization["mean"])
    out = {"y": y.numpy()}
    if isinstance(state, tuple):
        out["hn"], out["cn"] = state[0].numpy(), state[1].numpy()
    else:
        out["hn"] = state.numpy()
    return out


def _max_err(got: dict, want: dict, scale) -> tuple[float, float]:
    """(error in model units, raw max-abs). y is divided by std so the 1e-5 gate
    means the same for a series in the hundreds as for one near zero
    (float32 spacing at 300 is 3e-5). Without statistics (logits of
    classifiers, taggers, language models) y is divided by max(1, max|y|):
    a 10,000-way head with logits near 26 differs by ~1e-5 from float32
    summation order alone, which is noise, not a broken export. The LSTM cell
    state cn is unbounded too (a trained language model's reaches 15-20
    after 300 steps, where float32 spacing is ~2e-6 and 300 steps of
    summation-order differences add up to ~3e-5), so it is divided by
    max(1, max|cn|) as well; hn is bounded by 1 and compared raw."""
    model_units, raw = 0.0, 0.0
    for name, ref in want.items():
        diff = np.abs(got[name].astype(np.float64) - ref.astype(np.float64))
        raw = max(raw, float(diff.max(initial=0.0)))
        if name == "y" and scale is not None:
            diff = diff / scale
        elif name in ("y", "cn"):
            diff = diff / max(1.0, float(np.abs(ref).max(initial=0.0)))
        model_units = max(model_units, float(diff.max(initial=0.0)))
    return model_units, raw


def _session(onnx_model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    if isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx_model.SerializeToString()
    elif not isinstance(onnx_model, (bytes, bytearray)):
        onnx_model = str(onnx_model)
    return ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])


def check_parity(model: SequenceModel, onnx_model, normalization: dict | None = None,
                 tol: float | None = None) -> dict:
    """Compare ONNX Runtime with PyTorch on the convention's hard cases.

    onnx_model: a path, serialized bytes or a ModelProto. normalization: the
    statistics baked into the graph (read from its metadata when None and the
    file carries them). Returns {"checks": {name: {"max_abs", "raw_max_abs"}},
    "worst": name, "worst_max_abs", "tol", "passed"}.
    """
    tol = PARITY_TOL if tol is None else tol
    model = model.cpu().eval()
    sess = _session(onnx_model)
    if normalization is None:  # the graph's own statistics, from its metadata
        if isinstance(onnx_model, onnx.ModelProto):
            proto = onnx_model
        elif isinstance(onnx_model, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(onnx_model))
        else:
            proto = onnx.load(str(onnx_model))
        normalization = artifact.read_metadata(proto).get("normalization")
    scale = None if normalization is None else np.float64(normalization["std"])
    out_names = [o.name for o in sess.get_outputs()]

    def run(feeds):
        return dict(zip(out_names, sess.run(out_names, feeds)))

    cases = {  # name: (batch, time, zero_state)
        "batch=1 T=7": (1, 7, False),
        "batch=3 T=7": (3, 7, False),
        "batch=8 T=7": (8, 7, False),
        "batch=3 T=1": (3, 1, False),
        "batch=3 T=7 zero state": (3, 7, True),
        "batch=2 T=300": (2, 300, False),
    }
    checks = {}
    for i, (name, (b, t, zero)) in enumerate(cases.items()):
        feeds = example_inputs(model, b, t, normalization, zero_state=zero, seed=100 + i)
        err, raw = _max_err(run(feeds), _torch_reference(model, feeds, normalization), scale)
        checks[name] = {"max_abs": err, "raw_max_abs": raw}
    if model.config.directions == 1:
        # streaming contract: k calls of T=1 carrying hn/cn == one call of T=k
        k = 12
        feeds = example_inputs(model, 3, k, normalization, seed=7)
        want = _torch_reference(model, feeds, normalization)
        state = {n: v for n, v in feeds.items() if n != "x"}
        ys = []
        for step in range(k):
            got = run({"x": feeds["x"][:, step:step + 1], **state})
            ys.append(got["y"])
            state = {"h0": got["hn"], **({"c0": got["cn"]} if "cn" in got else {})}
        chained = {"y": np.concatenate(ys, axis=1), "hn": state["h0"]}
        if "c0" in state:
            chained["cn"] = state["c0"]
        err, raw = _max_err(chained, want, scale)
        checks[f"chained {k}x T=1"] = {"max_abs": err, "raw_max_abs": raw}
    worst = max(checks, key=lambda n: checks[n]["max_abs"])
    return {"checks": checks, "worst": worst, "worst_max_abs": checks[worst]["max_abs"],
            "tol": tol, "passed": checks[worst]["max_abs"] <= tol}


def format_report(report: dict) -> str:
    lines = [f"parity ONNX Runtime vs PyTorch (tol {report['tol']:.0e}, y in model units):"]
    for name, c in report["checks"].items():
        flag = "ok" if c["max_abs"] <= report["tol"] else "FAIL"
        lines.append(f"  {name:<24} max-abs {c['max_abs']:.3e}  (raw {c['raw_max_abs']:.3e})  {flag}")
    return "\n".join(lines)


def gate(model: SequenceModel, proto: onnx.ModelProto) -> dict:
    """check_parity that raises ParityError naming the worst case."""
    report = check_parity(model, proto, artifact.read_metadata(proto).get("normalization"))
    if not report["passed"]:
        raise ParityError(
            f"parity gate failed: {report['worst']} max-abs {report['worst_max_abs']:.3e} "
            f"> {report['tol']:.0e}; nothing written", report)
    return report


# ---------------------------------------------------------------- writing

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def export_model(model: SequenceModel, checkpoint: Checkpoint, path, source_run: str = "",
                 check: bool = True) -> dict | None:
    """Export to one file (outside a repository); gated unless check=False.

    The file is written beside PATH and renamed over it, so it is never partial.
    Returns the parity report (None when unchecked).
    """
    path = Path(path)
    proto = build_onnx(model, checkpoint, source_run)
    report = gate(model, proto) if check else None
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write_file(tmp, proto.SerializeToString())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def publish(repo, name: str, data: bytes, version: int | None = None, force: bool = False) -> Path:
    """Place DATA at REPO/NAME/VERSION/model.onnx atomically; returns the path.

    The file is written and fsynced in REPO/.export-*/ and the folder renamed
    into place, so a reader listing the repository sees no version or a
    complete one. An existing version is kept unless force (then the file is
    swapped with os.replace, still atomic).
    """
    artifact.check_model_name(name)
    if version is not None and version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    repo = Path(repo)
    base = repo / name
    base.mkdir(parents=True, exist_ok=True)
    tmp = repo / f".export-{name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        _write_file(tmp / artifact.MODEL_FILE, data)
        _fsync_dir(tmp)
        v = version if version is not None else max(artifact.versions(repo, name), default=0) + 1
        while True:
            target = base / str(v)
            if (target / artifact.MODEL_FILE).exists():
                if version is None:  # another export finished v meanwhile: take the next one
                    v += 1
                    continue
                if not force:
                    raise FileExistsError(f"{target / artifact.MODEL_FILE} exists (use --force to replace it)")
                os.replace(tmp / artifact.MODEL_FILE, target / artifact.MODEL_FILE)
                _fsync_dir(target)
                break
            try:
                os.rename(tmp, target)  # atomic; fails if another writer took this version
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or version is not None:
                    raise
                # a concurrent export (or a stray folder) holds v: take the next one
                v = max(v + 1, max(artifact.versions(repo, name), default=0) + 1)
                continue
            break
        _fsync_dir(base)
        return target / artifact.MODEL_FILE
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _run_metrics(run_dir: Path, ckpt: Checkpoint) -> dict:
    path = run_dir / METRICS_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return ckpt.metrics or {}


def export_run(run_dir, repo=artifact.DEFAULT_REPO, name: str | None = None,
               version: int | None = None, force: bool = False, log=print) -> Path:
    """Checkpoint in RUN_DIR -> gated REPO/NAME/VERSION/model.onnx. Returns the path.

    Raises ParityError (nothing written) when the gate fails.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_FILE
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path} not found (is {run_dir} a run folder from `seqserve train`?)")
    name = artifact.check_model_name(name or run_dir.resolve().name)
    try:
        model, ckpt = load_checkpoint(ckpt_path)
    except Exception as exc:  # unpickling/shape errors: report the file, not a traceback
        raise ValueError(f"{ckpt_path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None
    ckpt.metrics = _run_metrics(run_dir, ckpt)
    proto = build_onnx(model, ckpt, source_run=str(run_dir))
    try:
        report = gate(model, proto)
    except ParityError as exc:
        log(format_report(exc.report))
        raise
    log(format_report(report))
    path = publish(repo, name, proto.SerializeToString(), version=version, force=force)
    log(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqserve export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="run folder written by `seqserve train` (holds checkpoint.pt)")
    p.add_argument("--repo", default=artifact.DEFAULT_REPO, help="model repository root")
    p.add_argument("--name", help="model name in the repository (default: the run folder's name)")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--force", action="store_true", help="replace an existing version")
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    try:
        export_run(args.run_dir, args.repo, args.name, args.version, args.force)
    except ParityError as exc:
        print(f"seqserve export: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
