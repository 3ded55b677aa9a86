"""Fixtures for the deployment tests; the helpers live in deploy_helpers.py."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# test modules import deploy_helpers by name (pytest runs in importlib mode)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_helpers import HostService, compose_defaults, load_compose  # noqa: E402

# Small and quick: the test proves the job's wiring, not the model's quality.
QUICK_TRAIN_ARGS = "--epochs 1 --layers 1 --hidden 8 --window 16 --batch-size 64 --budget-s 2"


@pytest.fixture(scope="session")
def compose_env() -> dict[str, str]:
    """What an operator's .env would hold for this test: defaults except a quick
    training and a 1 s snapshot interval (so the kill -9 case is quick to show)."""
    return {"SEQSERVE_TRAIN_ARGS": QUICK_TRAIN_ARGS, "SEQSERVE_SNAPSHOT_S": "1"}


@pytest.fixture(scope="session")
def volume_dirs(tmp_path_factory) -> dict[str, Path]:
    """A host folder for every named volume in docker-compose.yml."""
    doc = load_compose()
    root = tmp_path_factory.mktemp("volumes")
    out = {}
    for name in doc.get("volumes", {}):
        out[name] = root / name
        out[name].mkdir()
    return out


@pytest.fixture(scope="session")
def trained(compose_env, volume_dirs, tmp_path_factory) -> dict:
    """The trainer service run once on the host: its result and the volume folders."""
    doc = load_compose(compose_env)
    trainer = HostService.create(doc, "trainer", volume_dirs)
    t0 = time.monotonic()
    result = trainer.run(timeout=900)
    seconds = time.monotonic() - t0
    assert result.returncode == 0, f"trainer failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return {"result": result, "seconds": seconds, "trainer": trainer, "doc": doc,
            "repo": volume_dirs["model_repository"], "runs": volume_dirs["training_runs"],
            "model": compose_defaults()["SEQSERVE_DEFAULT_MODEL"]}


def _compose_version(exe: str) -> tuple[str, tuple[int, ...]]:
    out = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    m = re.search(r"version v?(\d+)\.(\d+)\.(\d+)", text)
    assert m, f"cannot read the version of {exe}: {text!r}"
    return text.splitlines()[0], tuple(int(x) for x in m.groups())


@pytest.fixture(scope="session")
def docker_compose() -> dict:
    """Debian's docker-compose (installed with apt when missing): path and version.

    Skipped only when this machine has no apt at all; an apt that is there but
    fails is a test failure, not a skip.
    """
    exe = shutil.which("docker-compose")
    if exe is None:
        apt = shutil.which("apt-get")
        if apt is None:
            pytest.skip("docker-compose is not installed and apt-get is unavailable to install it")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = [apt, "install", "-y", "-q", "--no-install-recommends", "docker-compose"]
        res = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
        if res.returncode != 0:  # stale package lists: refresh once and retry
            subprocess.run([apt, "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
            res = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, f"apt-get install docker-compose failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        exe = shutil.which("docker-compose")
        assert exe, "apt-get installed docker-compose but it is not on PATH"
    line, version = _compose_version(exe)
    # 1.x is the Python implementation (Debian's package); 2.x the Go plugin.
    return {"exe": exe, "line": line, "version": version, "v2": version[0] >= 2}
