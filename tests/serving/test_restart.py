"""Sessions survive restarts: SIGTERM snapshot, periodic snapshot vs kill -9,
and a snapshot that no longer fits its model is refused and kept aside."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from serving.client import Client

pytestmark = pytest.mark.slow


def _start(repo, state, port, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "seqserve", "serve", "--repo", str(repo), "--port", str(port),
         "--metrics-port", "0", "--state-dir", str(state), "--snapshot-s", "0.5"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    client = Client(f"127.0.0.1:{port}")
    try:
        client.wait_ready(timeout=240)
    except TimeoutError:
        proc.kill()
        raise
    return proc, client


def _stream(client, xs, start):
    ys = []
    with client.stream("lstm") as s:
        for t, x in enumerate(xs):
            y, _ = s.step("dev-1", x, start=start and t == 0)
            ys.append(y[0])
    return ys


def test_state_survives_sigterm_and_kill9_within_the_snapshot_interval(tmp_path, kit):
    repo = tmp_path / "repo"
    kit.export_random(repo, "lstm", cell="lstm", seed=1)
    state = tmp_path / "state"
    port = kit.free_port()
    xs = np.random.default_rng(20).standard_normal((100, 3)).astype(np.float32)
    log = open(tmp_path / "server.log", "w")

    # run 1: 50 steps, a periodic snapshot, then a crash
    proc, client = _start(repo, state, port, log)
    ys = _stream(client, xs[:50], start=True)
    time.sleep(1.5)  # > --snapshot-s: the periodic snapshot holds all 50 steps
    proc.kill()
    proc.wait(10)
    client.close()

    # run 2: restored from the periodic snapshot; 25 steps, then SIGTERM
    proc, client = _start(repo, state, port, log)
    ys += _stream(client, xs[50:75], start=False)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    client.close()
    assert (state / "lstm.npz").is_file()

    # run 3: restored from the shutdown snapshot; the last 25 steps
    proc, client = _start(repo, state, port, log)
    ys += _stream(client, xs[75:], start=False)
    assert client.end_session("lstm", "dev-1") == 100
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    client.close()

    want = kit.ort_reference(repo / "lstm/1/model.onnx", xs[None])["y"][0]
    assert np.abs(np.array(ys) - want).max() <= 1e-4


def test_snapshot_of_a_changed_model_is_refused_and_kept_aside(tmp_path, kit):
    repo, state = tmp_path / "repo", tmp_path / "state"
    kit.export_random(repo, "lstm", cell="lstm", seed=1)
    port = kit.free_port()
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    proc, client = _start(repo, state, port, log)
    client.step("lstm", 5, np.zeros(3, np.float32), start=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    client.close()

    # same name, different shape: the old state must not be applied
    import shutil
    shutil.rmtree(repo / "lstm")
    kit.export_random(repo, "lstm", cell="lstm", hidden=8, seed=9)
    proc, client = _start(repo, state, port, log)
    try:
        with pytest.raises(Exception) as e:
            client.step("lstm", 5, np.zeros(3, np.float32))
        assert "start" in str(e.value)
        rejected = list((state / "rejected").glob("lstm.*.npz"))
        assert len(rejected) == 1 and not (state / "lstm.npz").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        client.close()
    text = log_path.read_text()
    assert "refused" in text and "hidden" in text
