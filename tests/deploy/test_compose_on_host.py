"""Each compose service's command, run on this host as its container would run
it (volumes -> temporary folders, container ports -> free host ports, env
from the compose file): the trainer publishes the default model and skips a
second time, the server passes the declared health check, and SIGTERM within
stop_grace_period leaves a snapshot that the next start restores, and after
kill -9 at most the last --snapshot-s interval is lost."""
from __future__ import annotations

import subprocess
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

from deploy_helpers import REPO_ROOT, HostService, duration_s, stop, tail
from seqserve import artifact

pytestmark = pytest.mark.slow


def test_trainer_publishes_the_default_model(trained):
    repo, name = trained["repo"], trained["model"]
    assert artifact.versions(repo, name) == [1]
    info = artifact.load_model_info(artifact.model_path(repo, name))
    assert (info.task, info.cell) == ("sine", "lstm")  # the compose defaults
    assert f"published {name}" in trained["result"].stdout


def test_trainer_skips_when_the_model_exists(trained):
    model = artifact.model_path(trained["repo"], trained["model"])
    checkpoint = trained["runs"] / trained["model"] / "checkpoint.pt"
    before = (model.stat().st_mtime_ns, checkpoint.stat().st_mtime_ns)
    again = trained["trainer"].run(timeout=300)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert artifact.versions(trained["repo"], trained["model"]) == [1]
    assert (model.stat().st_mtime_ns, checkpoint.stat().st_mtime_ns) == before, "trained or exported again"


def _stub(port: int):
    import grpc

    from protos.seqserve.v1 import inference_pb2 as pb, inference_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb, pb_grpc.InferenceStub(channel)


def _step(port: int, model: str, sequence_id: int, value: float, start: bool):
    channel, pb, stub = _stub(port)
    with channel:
        reply = stub.Step(pb.StepRequest(model=model, sequence_id=sequence_id, start=start,
                                         x=pb.Tensor(shape=[1], float_data=[value])), timeout=30)
    return reply.position, np.asarray(reply.y.float_data, np.float32)


def _reference(repo, name: str, inputs: list[float]) -> np.ndarray:
    """Independent reference: ONNX Runtime on the whole sequence from zero state; last step's y."""
    sess = ort.InferenceSession(str(artifact.model_path(repo, name)), providers=["CPUExecutionProvider"])
    feeds = {"x": np.asarray(inputs, np.float32).reshape(1, -1, 1)}  # (B=1, T, F=1)
    for i in sess.get_inputs()[1:]:  # h0, c0: zero state, (layers*dirs, B=1, hidden)
        feeds[i.name] = np.zeros([1 if d == "batch" else d for d in i.shape], np.float32)
    return sess.run(["y"], feeds)[0][0, -1]  # (outputs,)


def test_server_is_healthy_and_keeps_sessions_across_restarts(trained, volume_dirs, tmp_path):
    doc, name, repo = trained["doc"], trained["model"], trained["repo"]
    server = HostService.create(doc, "server", volume_dirs)
    grace_s = duration_s(server.spec["stop_grace_period"])
    cmd = server.spec["command"]
    snapshot_s = float(cmd[cmd.index("--snapshot-s") + 1])
    state = server.volumes[cmd[cmd.index("--state-dir") + 1]]
    log = tmp_path / "server.log"
    inputs = [0.5, -0.25, 0.75, 0.1, -0.6]
    sid = 4242

    # 1. up, healthy by the declared check, serving a session and live metrics; then `docker compose stop`
    proc = server.start(log)
    try:
        print(f"server healthy after {server.wait_healthy(proc, log):.1f}s")
        assert _step(server.ports[50051], name, sid, inputs[0], start=True)[0] == 1
        assert _step(server.ports[50051], name, sid, inputs[1], start=False)[0] == 2
        # what deploy/prometheus.yml scrapes: the container's metrics port, live data
        with urllib.request.urlopen(f"http://127.0.0.1:{server.ports[8002]}/metrics", timeout=10) as r:
            assert r.status == 200
            text = r.read().decode()
        assert f'seqserve_live_sessions{{model="{name}"}} 1.0' in text, text[:2000]
        code = stop(proc, grace_s)  # SIGTERM, SIGKILL after stop_grace_period
    finally:
        stop(proc, 5)
    assert code == 0, f"server did not exit cleanly within stop_grace_period ({grace_s}s): {code}\n{tail(log)}"
    assert (state / f"{name}.npz").is_file(), f"no snapshot in the state volume: {sorted(p.name for p in state.iterdir())}"

    # 2. started again on the same volumes: the session continues; then a crash (kill -9)
    server = HostService.create(doc, "server", volume_dirs)
    proc = server.start(log)
    try:
        server.wait_healthy(proc, log)
        position, y = _step(server.ports[50051], name, sid, inputs[2], start=False)
        assert position == 3
        np.testing.assert_allclose(y.reshape(-1), _reference(repo, name, inputs[:3]).reshape(-1), atol=1e-4)
        time.sleep(2.5 * snapshot_s)  # at least one periodic snapshot holds step 3
        assert _step(server.ports[50051], name, sid, inputs[3], start=False)[0] == 4
        proc.kill()
        proc.wait()
    finally:
        stop(proc, 5)

    # 3. after the crash at most the last --snapshot-s is lost: step 3 survived, step 4 may not have
    server = HostService.create(doc, "server", volume_dirs)
    proc = server.start(log)
    try:
        server.wait_healthy(proc, log)
        position, y = _step(server.ports[50051], name, sid, inputs[4], start=False)
        assert stop(proc, grace_s) == 0, tail(log)
    finally:
        stop(proc, 5)
    assert position in (4, 5), f"position {position} after kill -9: the periodic snapshot did not hold step 3"
    seen = inputs[:3] + ([inputs[3]] if position == 5 else []) + [inputs[4]]
    np.testing.assert_allclose(y.reshape(-1), _reference(repo, name, seen).reshape(-1), atol=1e-4)


def test_gpu_server_without_a_gpu_is_not_healthy(trained, volume_dirs, tmp_path):
    """server-gpu asks for --device cuda: on a host without a GPU the model is not
    served, and the declared health check must say so (not "SERVING nothing")."""
    from numba import cuda

    if cuda.is_available():
        pytest.skip("this host has a CUDA GPU: server-gpu would be healthy here")
    server = HostService.create(trained["doc"], "server-gpu", volume_dirs)
    log = tmp_path / "server-gpu.log"
    overall = [server.healthcheck[0], server.healthcheck[1], "--port", str(server.ports[50051])]
    proc = server.start(log)
    try:
        t0 = time.monotonic()
        # wait until loading is over: the server as a whole says SERVING (or it exited)
        while proc.poll() is None and time.monotonic() - t0 < 180:
            if subprocess.run(overall, cwd=REPO_ROOT, env=server.env(), capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        assert proc.poll() is None or proc.returncode != 0, tail(log)
        probe = server.probe()
        assert probe.returncode != 0, f"healthy without a GPU: {probe.stdout}\n{tail(log)}"
        assert "cuda" in log.read_text().lower(), "no log line says why the model is not served"
    finally:
        stop(proc, 10)
