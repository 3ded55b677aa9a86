"""`seqserve serve | predict | stream`: the server and its command-line clients.

  seqserve serve [--repo model_repository] [--port 50051] [--state-dir DIR] ...
  seqserve predict --model NAME --input FILE.csv|FILE.npy     (or --text "...")
  seqserve stream --model NAME  < values                       (one step per line)

`tail -f sensor.log | seqserve stream --model sine-lstm` prints each step's
output as soon as it comes back. Errors are one line on stderr with a
non-zero exit code.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

DEFAULT_TARGET = os.environ.get("SEQSERVE_TARGET", "127.0.0.1:50051")


def serve_main(argv: list[str] | None = None) -> int:
    from serving import eventloop
    from serving.server import StartupFailed, serve
    from serving.settings import from_args

    settings = from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        eventloop.run(serve(settings), settings.loop)
    except StartupFailed as exc:
        print(f"seqserve serve: error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---- output formatting ---------------------------------------------------------------

def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def describe(meta, y: np.ndarray, top_k: int = 3) -> str:
    """One step's output (out,) as a line a person can read."""
    kind = meta.output_kind
    if kind in ("classify", "tag"):
        names = list(meta.labels) or list(meta.output_names) or [str(i) for i in range(len(y))]
        p = _softmax(y)
        order = np.argsort(-p)[: max(1, top_k)]
        best = order[0]
        rest = ", ".join(f"{names[i]} {p[i]:.3f}" for i in order[1:])
        return f"{names[best]} {p[best]:.3f}" + (f" ({rest})" if rest else "")
    if kind == "lm":
        vocab = list(meta.vocab) or [str(i) for i in range(len(y))]
        p = _softmax(y)
        order = np.argsort(-p)[: max(1, top_k)]
        return "  ".join(f"{vocab[i]} {p[i]:.3f}" for i in order)
    names = list(meta.output_names) or [f"y{i}" for i in range(len(y))]
    if len(y) == 1:
        return f"{y[0]:.6g}"
    return " ".join(f"{n}={v:.6g}" for n, v in zip(names, y))


def _fail(cmd: str, exc) -> int:
    import grpc

    if isinstance(exc, grpc.RpcError):
        print(f"seqserve {cmd}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    else:
        print(f"seqserve {cmd}: error: {exc}", file=sys.stderr)
    return 1


# ---- connection flags (predict, stream) --------------------------------------------------

def add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="server address (env SEQSERVE_TARGET)")
    p.add_argument("--token", default=os.environ.get("SEQSERVE_TOKEN") or None,
                   help="bearer token for a server with --auth-tokens (env SEQSERVE_TOKEN)")
    p.add_argument("--tls-ca", default=None,
                   help="PEM CA that signed the server certificate: connect with TLS")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    p.add_argument("--server-name", default=None,
                   help="name to check the server certificate against (default: the target host)")


def connect(a, timeout: float | None = 30.0):
    from serving.client import Client

    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(a, flag)
        if path and not os.path.isfile(path):
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")
    return Client(a.target, timeout=timeout, token=a.token, tls_ca=a.tls_ca, tls_cert=a.tls_cert,
                  tls_key=a.tls_key, server_name=a.server_name)


# ---- predict ---------------------------------------------------------------------------

def _read_sequences(path: str, meta) -> np.ndarray:
    """A .npy of (B, T, F) / (T, F) / (B, T) ids, or a CSV of one sequence (rows = steps)."""
    if path.endswith(".npy"):
        x = np.load(path, allow_pickle=False)
    elif path.endswith(".csv"):
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                cells = [c for c in line.replace(";", ",").split(",")]
                try:
                    rows.append([float(c) for c in cells])
                except ValueError:
                    if n == 1:  # a header row
                        continue
                    raise ValueError(f"{path}:{n}: not a number in {line!r}") from None
        if not rows:
            raise ValueError(f"{path}: no rows")
        x = np.asarray(rows, np.float64)
    else:
        raise ValueError(f"{path}: use a .csv or .npy file")
    tokens = meta.input_kind == "tokens"
    if tokens:
        x = np.asarray(x)
        if x.dtype.kind == "f":
            if not np.all(x == np.round(x)):
                raise ValueError(f"{path}: token ids must be integers")
            x = x.astype(np.int64)
        return x[None] if x.ndim == 1 else x
    x = np.asarray(x, np.float32)
    if x.ndim == 1:
        x = x[:, None] if meta.input_features == 1 else x[None]
    return x[None] if x.ndim == 2 else x


def predict_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqserve predict",
                                description="Send whole sequences (or text) to a running server.")
    p.add_argument("--model", required=True)
    p.add_argument("--input", help="a .csv (one sequence, a row per step) or .npy file")
    p.add_argument("--text", action="append", help="raw text for a text model (repeatable)")
    add_connection_flags(p)
    p.add_argument("--top-k", type=int, default=3, help="labels / words to show")
    p.add_argument("--all-steps", action="store_true", help="print every step, not just the last")
    a = p.parse_args(argv)
    if bool(a.input) == bool(a.text):
        raise ValueError("give exactly one of --input FILE or --text TEXT")
    import grpc

    try:
        with connect(a) as client:
            meta = client.metadata(a.model)
            if a.text:
                out = client.predict(a.model, text=a.text)
                lengths = out["lengths"]
            else:
                x = _read_sequences(a.input, meta)
                out = client.predict(a.model, x)
                lengths = [x.shape[1]] * x.shape[0]
    except grpc.RpcError as exc:
        return _fail("predict", exc)
    y = out["y"]  # (B, T, out)
    for b in range(y.shape[0]):
        label = a.text[b] if a.text else f"sequence {b}"
        print(f"{label}:")
        if meta.output_kind == "tag":
            for line in tag_lines(meta, y[b, : lengths[b]], a.text[b] if a.text else None):
                print(f"  {line}")
            continue
        steps = range(lengths[b]) if a.all_steps else [lengths[b] - 1]
        for t in steps:
            print(f"  step {t}: {describe(meta, y[b, t], a.top_k)}")
    return 0


def tag_lines(meta, y: np.ndarray, text: str | None = None) -> list[str]:
    """A tagged sequence y (T, tags) as lines: each token's tag, then the entities.

    BIO labels are decoded to the most probable VALID tag sequence
    (seqserve.tagging.decode_bio, as training reports); other labels per token.
    """
    from seqserve.tagging import decode_bio, entities

    labels = list(meta.labels) or list(meta.output_names) or [str(i) for i in range(y.shape[-1])]
    tokens = None
    if text is not None:
        from seqserve.text import Tokenizer

        info = json.loads(meta.metadata_json or "{}")
        tokens = Tokenizer.from_metadata(info.get("tokenizer"), list(meta.vocab)).tokenize(text)
        tokens = tokens if len(tokens) == len(y) else None
    try:
        ids = decode_bio(y, labels)
        bio = True
    except ValueError:  # labels that are not BIO tags
        ids, bio = y.argmax(-1).tolist(), False
    lines = []
    for t, i in enumerate(ids):
        p = _softmax(y[t])[i]
        word = f"{tokens[t]!r} " if tokens else ""
        lines.append(f"step {t}: {word}{labels[i]} {p:.3f}")
    if bio:
        found = entities([labels[i] for i in ids], tokens)
        lines.append("entities: " + (", ".join(
            f"{e['type']} {e['text']!r}" if "text" in e else f"{e['type']} [{e['start']}, {e['end']})"
            for e in found) or "none"))
    return lines


# ---- stream ----------------------------------------------------------------------------

def continuation(client, meta, sequence, a) -> str:
    """The session rolled out a.continue_steps steps (left as it was), as one line."""
    lm = meta.output_kind == "lm"
    kw = dict(temperature=a.temperature, top_k=a.sample_top_k, seed=a.seed) if lm else {}
    y, _, tokens = client.rollout(meta.name, sequence, a.continue_steps, tokens=True, **kw)
    if lm:
        vocab = list(meta.vocab)
        return "continuation: " + " ".join(vocab[t] for t in tokens)
    return "continuation: " + "; ".join(describe(meta, row) for row in y)


def stream_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="seqserve stream",
        description="Read one step per stdin line and print each step's output as it comes.")
    p.add_argument("--model", required=True)
    p.add_argument("--sequence", default=None, help="session id (default: one per process)")
    add_connection_flags(p)
    p.add_argument("--top-k", type=int, default=3, help="next words / labels to show")
    p.add_argument("--keep", action="store_true", help="do not end the session at end of input")
    g = p.add_argument_group("continuation (Rollout) at end of input")
    g.add_argument("--continue", dest="continue_steps", type=int, default=0, metavar="N",
                   help="then roll out N more steps from the session (a language model: N words)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="language models: 0 = greedy, > 0 = sample from softmax(logits / T)")
    g.add_argument("--sample-top-k", type=int, default=0, help="sample among the K most probable words")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (repeatable continuation)")
    a = p.parse_args(argv)
    if a.continue_steps < 0:
        raise ValueError("--continue must be >= 0")
    import grpc

    from serving.client import StepError

    sequence = a.sequence or f"cli-{os.getpid()}"
    if sequence.isdigit():
        sequence = int(sequence)
    started = False
    try:
        with connect(a, timeout=None) as client:
            meta = client.metadata(a.model)
            if not meta.can_stream:
                raise ValueError(f"model {a.model!r} cannot stream (bidirectional): use predict")
            tokens = meta.input_kind == "tokens"
            with client.stream(a.model) as stream:
                for n, line in enumerate(sys.stdin, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        if tokens:
                            y, _ = stream.step(sequence, text=line, start=not started)
                        else:
                            x = [float(v) for v in line.replace(",", " ").split()]
                            y, _ = stream.step(sequence, x, start=not started)
                    except ValueError:
                        print(f"seqserve stream: line {n}: not numbers: {line!r}", file=sys.stderr)
                        continue
                    except StepError as exc:
                        print(f"seqserve stream: line {n}: {exc}", file=sys.stderr)
                        continue
                    started = True
                    print(describe(meta, y[-1], a.top_k), flush=True)
            if started and a.continue_steps:
                print(continuation(client, meta, sequence, a), flush=True)
            if started and not a.keep:
                client.end_session(a.model, sequence)
    except grpc.RpcError as exc:
        return _fail("stream", exc)
    return 0
