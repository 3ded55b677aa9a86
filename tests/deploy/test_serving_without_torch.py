"""The serving dependency set (the package without extras, what the server
images install) installs into a clean venv without torch and serves."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from deploy_helpers import REPO_ROOT, free_port, stop, tail

pytestmark = pytest.mark.slow

@pytest.fixture(scope="session")
def serving_venv(tmp_path_factory):
    """A clean venv (no system site-packages) with `pip install -e <repo>`: no extras.

    Editable, so the server runs the checkout's own files: Numba's on-disk
    cache is keyed by source path, and the kernels the other tests compiled
    are reused instead of JIT-compiling them all again (tens of seconds).
    Every dependency still comes from this venv alone.
    """
    venv = tmp_path_factory.mktemp("serving-venv") / "venv"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # this venv's pip drives the install into the new one (--python), saving an ensurepip run
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-compile",
                          "-e", str(REPO_ROOT)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"pip install of the serving set failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    print(f"serving venv built in {time.monotonic() - t0:.1f}s")
    return venv


def _py(venv, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=venv)


def test_serving_set_has_no_torch(serving_venv):
    res = _py(serving_venv, "import torch")
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr
    res = _py(serving_venv, "import sys, onnxruntime, numba, grpc, grpc_health.v1.health, serving.server, "
                            "numba_cells; print(sys.prefix)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(serving_venv), "imported from somewhere else than the clean venv"
    # training is refused with a one-line hint, not a traceback
    train = subprocess.run([str(serving_venv / "bin" / "seqserve"), "train", "--task", "sine", "--out", "x"],
                           capture_output=True, text=True, timeout=300, cwd=serving_venv)
    assert train.returncode == 2 and "seqserve[train]" in train.stderr and "Traceback" not in train.stderr


def test_serving_set_serves_and_reports_serving(serving_venv, trained, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [str(serving_venv / "bin" / "seqserve"), "serve", "--repo", str(trained["repo"]), "--host",
           "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--state-dir", str(tmp_path / "state")]
    with open(log, "wb") as out:
        # cwd outside the checkout, so nothing is imported from the source tree
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the same probe the images run, with the clean venv's python
        probe = [str(serving_venv / "bin" / "python"), str(REPO_ROOT / "deploy" / "healthcheck.py"),
                 "--port", str(port)]
        t0, seen = time.monotonic(), None
        while time.monotonic() - t0 < 180:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{tail(log)}"
            seen = subprocess.run(probe, capture_output=True, text=True, timeout=30)
            if seen.returncode == 0:
                break
            time.sleep(0.5)
        assert seen is not None and seen.returncode == 0, f"{seen.stdout}{seen.stderr}\n{tail(log)}"
        assert "SERVING" in seen.stdout
        assert stop(proc, 60) == 0, tail(log)
    finally:
        stop(proc, 5)
