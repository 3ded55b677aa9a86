"""Helpers for the deployment tests (imported as deploy_helpers; conftest.py puts this folder on sys.path): read docker-compose.yml the way compose
does, and run a service's command on this host as if it were its container.

No Docker engine runs here, so a container is emulated by what it changes for
the command: each volume's mount point (e.g. /models) becomes a temporary
folder, each published container port (e.g. 50051) becomes a free host port,
the working directory is the repository root (the images' WORKDIR /app holds
the same deploy/ folder), and the environment is the service's
`environment:` block on top of a PATH that finds this venv's `python` and
`seqserve`.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml  # PyYAML, from the [dev] extra

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "Dockerfile"

# $$ | ${NAME} | ${NAME:-default} | ${NAME-default} | ${NAME:?err} | ${NAME?err} | $NAME
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution on one string."""

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise ValueError(f"compose variable {name} is required: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def resolve(node, env: dict[str, str]):
    """Interpolate every string in a parsed compose document."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml parsed (YAML anchors and merge keys applied) and interpolated."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    return resolve(doc, env or {})


def compose_defaults() -> dict[str, str]:
    """{VAR: default} for every ${VAR:-default} in docker-compose.yml."""
    out: dict[str, str] = {}
    for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}", COMPOSE_FILE.read_text()):
        out.setdefault(m.group(1), m.group(2))
    return out


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of an env file (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            key, _, value = s.partition("=")
            out[key.strip()] = value.strip()
    return out


def duration_s(text) -> float:
    """Compose durations: 90, '90s', '1m30s', '500ms', '2h'."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_volume(entry: str) -> tuple[str, str]:
    """'source:/target[:mode]' -> (source, /target)."""
    parts = entry.split(":")
    return parts[0], parts[1]


def split_port(entry) -> tuple[str, int]:
    """'HOST:CONTAINER' -> (host, container)."""
    host, _, container = str(entry).rpartition(":")
    return host, int(container)


@dataclass
class HostService:
    """One compose service's command, run on this host as its container would run it."""

    name: str
    spec: dict
    volumes: dict[str, Path]  # container mount point -> host folder
    ports: dict[int, int] = field(default_factory=dict)  # container port -> host port

    @classmethod
    def create(cls, doc: dict, name: str, volume_dirs: dict[str, Path]) -> "HostService":
        """volume_dirs maps each named volume to a host folder (shared between services)."""
        spec = doc["services"][name]
        volumes = {}
        for entry in spec.get("volumes", []):
            source, target = split_volume(entry)
            if source not in volume_dirs:
                raise KeyError(f"{name}: no host folder for volume {source!r}")
            volumes[target] = volume_dirs[source]
        ports = {split_port(p)[1]: free_port() for p in spec.get("ports", [])}
        return cls(name, spec, volumes, ports)

    def map_arg(self, arg: str) -> str:
        for target, host in self.volumes.items():
            if arg == target or arg.startswith(target + "/"):
                return str(host) + arg[len(target):]
        if arg.isdigit() and int(arg) in self.ports:
            return str(self.ports[int(arg)])
        return arg

    def argv(self, args: list[str]) -> list[str]:
        return [self.map_arg(str(a)) for a in args]

    @property
    def command(self) -> list[str]:
        cmd = self.spec["command"]
        assert isinstance(cmd, list), f"{self.name}: command must be a list (exec form)"
        return self.argv(cmd)

    @property
    def healthcheck(self) -> list[str]:
        test = self.spec["healthcheck"]["test"]
        assert test[0] == "CMD", f"{self.name}: healthcheck must be exec form ['CMD', ...], got {test[0]!r}"
        return self.argv(test[1:])

    def env(self) -> dict[str, str]:
        # the developer's own SEQSERVE_* must not leak in: only the compose file speaks
        base = {k: v for k, v in os.environ.items() if not k.startswith("SEQSERVE_")}
        base["PATH"] = str(Path(sys.executable).parent) + os.pathsep + base.get("PATH", "")
        base["PYTHONUNBUFFERED"] = "1"
        for key, value in (self.spec.get("environment") or {}).items():
            base[key] = self.map_arg("" if value is None else str(value))
        return base

    def run(self, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(self.command, cwd=REPO_ROOT, env=self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def start(self, log_path: Path) -> subprocess.Popen:
        log = open(log_path, "ab")
        try:
            return subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env(), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def probe(self) -> subprocess.CompletedProcess:
        """One run of the declared health check."""
        timeout = duration_s(self.spec["healthcheck"].get("timeout", "30s"))
        try:
            return subprocess.run(self.healthcheck, cwd=REPO_ROOT, env=self.env(), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, "", f"timed out after {timeout}s")

    def wait_healthy(self, proc: subprocess.Popen, log_path: Path) -> float:
        """Probe until healthy the way Docker judges it; seconds it took.

        Docker ignores failures during start_period, then marks the container
        unhealthy after `retries` failures `interval` apart: that is the
        deadline. Probing more often than `interval` only samples faster.
        """
        hc = self.spec["healthcheck"]
        deadline_s = duration_s(hc.get("start_period", "0s")) + duration_s(hc.get("interval", "30s")) * int(
            hc.get("retries", 3))
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < deadline_s:
            if proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {proc.returncode} before it was healthy:\n"
                            f"{tail(log_path)}")
            last = self.probe()
            if last.returncode == 0:
                return time.monotonic() - t0
            time.sleep(0.5)
        pytest.fail(f"{self.name} not healthy within {deadline_s:.0f}s; last probe: "
                    f"{last.stdout if last else ''}{last.stderr if last else ''}\n{tail(log_path)}")


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM like `docker stop`, SIGKILL after grace_s; the exit code (negative if killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
