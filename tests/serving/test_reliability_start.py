"""A model the operator asked for that does not load keeps the server from looking healthy."""
import subprocess
import sys

import pytest

from serving.server import StartupFailed


def _has_gpu() -> bool:
    try:
        from numba import cuda

        return cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(_has_gpu(), reason="this host has a CUDA GPU")
def test_device_cuda_without_gpu_refuses_to_start_in_process(model_repo, kit):
    with pytest.raises(StartupFailed, match="(?i)cuda"):
        kit.start_server(repo=str(model_repo), device="cuda")


@pytest.mark.skipif(_has_gpu(), reason="this host has a CUDA GPU")
def test_serve_device_cuda_without_gpu_exits_nonzero(model_repo, kit):
    port = kit.free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "seqserve.cli", "serve", "--repo", str(model_repo), "--device",
         "cuda", "--port", str(port), "--metrics-port", "0"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("seqserve serve: error:") and "cuda" in last.lower(), last
    assert "Traceback" not in proc.stderr
