"""Server settings: one dataclass, filled from the CLI and SEQSERVE_* env vars.

Precedence: command-line flag > environment variable > default. The
environment name of a field is SEQSERVE_ + its upper-cased name, e.g.
SEQSERVE_SESSION_IDLE_S=60.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from seqserve.artifact import DEFAULT_REPO


@dataclass
class Settings:
    repo: str = DEFAULT_REPO
    """Model repository: REPO/NAME/VERSION/model.onnx."""
    host: str = "127.0.0.1"
    """Address to bind (0.0.0.0 to accept remote clients)."""
    port: int = 50051
    """gRPC port for every service (0 picks a free one)."""
    metrics_port: int = 8002
    """Prometheus /metrics HTTP port (0 disables)."""
    state_dir: str = ""
    """Where session snapshots are written and restored from ("" disables persistence)."""
    snapshot_s: float = 30.0
    """Seconds between periodic snapshots (a kill -9 loses at most this much; 0 disables)."""
    session_idle_s: float = 300.0
    """A session with no step for this long is freed."""
    max_sessions: int = 200_000
    """Live sessions per model; further starts get RESOURCE_EXHAUSTED."""
    max_sessions_per_tenant: int = 0
    """Live sessions per tenant over every model (0: no quota); further starts get RESOURCE_EXHAUSTED."""
    max_queue: int = 10_000
    """Steps queued per model waiting to run; beyond it new work gets RESOURCE_EXHAUSTED at once."""
    max_concurrent_rpcs: int = 0
    """RPCs (a stream counts as one) the server runs at once; more get RESOURCE_EXHAUSTED (0: no limit)."""
    max_predict_inflight: int = 64
    """Predict calls per model running at once; more get RESOURCE_EXHAUSTED."""
    bulk_nice: int = 5
    """Nice value added to the worker threads of bulk work (model loading, so ONNX Runtime's pools, and big Predict calls): the event loop keeps the CPU under overload (0: same priority)."""
    max_steps_per_request: int = 4096
    """Most steps one request may carry (chunk length, rollout length, steps per stream message)."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    auth_tokens: str = ""
    """JSON file {"TOKEN": "TENANT"}: require bearer tokens, sessions per tenant ("" disables)."""
    tls_cert: str = ""
    """PEM server certificate chain: serve TLS on the gRPC port (with --tls-key)."""
    tls_key: str = ""
    """PEM private key of --tls-cert."""
    tls_client_ca: str = ""
    """PEM CA bundle: require client certificates signed by it (mutual TLS)."""
    device: str = "auto"
    """Streaming cell device: auto | cpu | cuda."""
    models: list = field(default_factory=list)
    """Pinned versions as NAME:VERSION; other models serve their newest version."""
    grace_s: float = 5.0
    """Seconds in-flight RPCs get to finish on shutdown."""
    log_level: str = "INFO"
    """Logging level."""
    loop: str = "auto"
    """Event loop: auto (uvloop when installed, else asyncio) | uvloop | asyncio."""
    gc_gen0: int = 20_000
    """Allocations between the garbage collector's young passes once ready (Python's default 700); what is loaded at start is frozen out of every pass. 0 keeps Python's defaults."""

    def validate(self) -> "Settings":
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("max_sessions", "max_steps_per_request", "max_message_bytes", "max_queue",
                     "max_predict_inflight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name in ("max_sessions_per_tenant", "max_concurrent_rpcs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 (no limit) or positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
        if self.auth_tokens:
            from serving.auth import check_token_file

            check_token_file(self.auth_tokens)
        if not 0 <= self.bulk_nice <= 19:
            raise ValueError(f"--bulk-nice must be 0..19, got {self.bulk_nice}")
        if self.gc_gen0 < 0:
            raise ValueError("--gc-gen0 must be 0 (Python's defaults) or positive")
        if self.session_idle_s <= 0:
            raise ValueError("--session-idle-s must be positive")
        from serving.eventloop import resolve

        resolve(self.loop)  # raises on an unknown loop, or uvloop asked for but missing
        self.pins()  # raises on a malformed NAME:VERSION
        return self

    def pins(self) -> dict[str, int]:
        out = {}
        for item in self.models:
            name, sep, version = str(item).partition(":")
            if not sep or not version.isdigit():
                raise ValueError(f"--models entries are NAME:VERSION, got {item!r}")
            out[name] = int(version)
        return out


def _doc(f) -> str:
    # the docstring under each field is the help text; read it from the source
    return _FIELD_DOCS.get(f.name, "")


def _field_docs() -> dict[str, str]:
    import inspect

    src = inspect.getsource(Settings).splitlines()
    docs, last = {}, None
    for line in src:
        s = line.strip()
        if ":" in s and "=" in s and not s.startswith(('"', "def", "#")):
            last = s.split(":", 1)[0]
        elif s.startswith('"""') and last:
            docs[last] = s.strip('"')
            last = None
    return docs


_FIELD_DOCS = _field_docs()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqserve serve", description="Serve every model in a repository over gRPC.")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "models":
            p.add_argument(flag, nargs="*", default=None, metavar="NAME:VERSION", help=_doc(f))
        else:
            typ = type(f.default)
            p.add_argument(flag, type=typ, default=None, help=f"{_doc(f)} (default {f.default!r})")
    return p


def from_args(argv: list[str] | None = None, env: dict | None = None) -> Settings:
    """Settings from argv (flags) over env (SEQSERVE_*) over the defaults."""
    env = os.environ if env is None else env
    args = parser().parse_args(argv or [])
    values = {}
    for f in fields(Settings):
        flag = getattr(args, f.name)
        raw = env.get("SEQSERVE_" + f.name.upper())
        if flag is not None:
            values[f.name] = flag
        elif raw is not None:
            if f.name == "models":
                values[f.name] = raw.replace(",", " ").split()
            else:
                try:
                    values[f.name] = type(f.default)(raw)
                except ValueError:
                    raise ValueError(f"SEQSERVE_{f.name.upper()}={raw!r} is not a {type(f.default).__name__}")
    return Settings(**values).validate()
