"""`seqserve export`: version numbering, atomic publication, and the gate writing nothing."""
from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest

from seqserve import artifact
from seqserve.cli import main as cli_main
from training import export


def quiet(*_):
    pass


def test_versions_count_up(make_run, repo):
    run, _, _ = make_run(cell="gru")
    assert export.export_run(run, repo, "m", log=quiet) == repo / "m" / "1" / "model.onnx"
    assert export.export_run(run, repo, "m", log=quiet) == repo / "m" / "2" / "model.onnx"
    assert export.export_run(run, repo, "m", version=7, log=quiet).parent.name == "7"
    assert export.export_run(run, repo, "m", log=quiet).parent.name == "8"  # next after the highest
    assert artifact.versions(repo, "m") == [1, 2, 7, 8]
    assert artifact.list_models(repo) == {"m": [1, 2, 7, 8]}


def test_existing_version_is_kept_unless_forced(make_run, repo):
    run_a, _, _ = make_run("a", cell="lstm", seed=1)
    run_b, _, _ = make_run("b", cell="lstm", seed=2)
    path = export.export_run(run_a, repo, "m", version=1, log=quiet)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        export.export_run(run_b, repo, "m", version=1, log=quiet)
    assert path.read_bytes() == before
    export.export_run(run_b, repo, "m", version=1, force=True, log=quiet)
    assert path.read_bytes() != before
    assert artifact.load_model_info(path).source_run.endswith("b")
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]


def test_a_stray_folder_does_not_block_the_next_version(make_run, repo):
    run, _, _ = make_run()
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / "notes.txt").write_text("not a model")
    assert export.export_run(run, repo, "m", log=quiet).parent.name == "2"


def test_reader_never_sees_a_partial_model(make_run, repo, monkeypatch):
    """Writes are slowed down in the middle; a reader polling the repository
    must only ever find complete, valid models, and no temp folder is left."""
    run, _, _ = make_run(cell="lstm", layers=2, hidden=32)
    real_write = export._write_file

    def slow_write(path, data):
        with open(path, "wb") as f:  # half now, half later: a window for a careless writer
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(0.15)
        real_write(path, data)

    monkeypatch.setattr(export, "_write_file", slow_write)
    seen, bad, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            for name, vs in artifact.list_models(repo).items():
                for v in vs:
                    try:
                        info = artifact.load_model_info(artifact.model_path(repo, name, v))
                        seen.add((name, v, info.cell))
                    except Exception as exc:  # noqa: BLE001 - any failure is the finding
                        bad.append(f"{name}/{v}: {exc}")
            time.sleep(0.005)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(3):
            export.export_run(run, repo, "m", log=quiet)
        export.export_run(run, repo, "m", version=2, force=True, log=quiet)
        time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert not bad, bad[:3]
    assert {v for _, v, _ in seen} == {1, 2, 3}
    assert sorted(p.name for p in repo.iterdir()) == ["m"]  # the .export-* folders are gone
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "3"]
    assert sorted(p.name for p in (repo / "m" / "2").iterdir()) == ["model.onnx"]


def corrupt_one_weight(build):
    """Wrap build_onnx so the recurrent weights drift by 1e-3 after export."""

    def built(*args, **kwargs):
        proto = build(*args, **kwargs)
        init = next(t for t in proto.graph.initializer if t.name.startswith("onnx::LSTM"))
        w = onnx.numpy_helper.to_array(init).copy()
        w.flat[0] += 1e-3
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        return proto

    return built


def test_failing_gate_writes_nothing(make_run, repo, monkeypatch, capsys):
    run, _, _ = make_run(cell="lstm")
    monkeypatch.setattr(export, "build_onnx", corrupt_one_weight(export.build_onnx))
    with pytest.raises(export.ParityError, match="parity gate failed: .* max-abs .* > 1e-05") as exc:
        export.export_run(run, repo, "m")
    assert exc.value.report["worst_max_abs"] > 1e-5
    assert exc.value.report["worst"] in str(exc.value)  # the message names the worst case
    assert "FAIL" in capsys.readouterr().out
    assert not repo.exists()
    # through the CLI: exit 1, one line naming the worst case, still nothing written
    assert cli_main(["export", str(run), "--repo", str(repo), "--name", "m"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parity gate failed" in err[0] and "nothing written" in err[0]
    assert not repo.exists()


def test_zero_tolerance_fails_the_gate(make_run, repo, monkeypatch):
    """An exact-equality gate trips on float rounding over T=300: proves the
    gate's verdict depends on the measured error, not a constant."""
    run, model, _ = make_run(cell="rnn", layers=2)
    proto = export.build_onnx(model, export.load_checkpoint(run / "checkpoint.pt")[1])
    report = export.check_parity(model, proto)
    assert report["passed"] and report["worst_max_abs"] > 0  # nonzero rounding error exists
    monkeypatch.setattr(export, "PARITY_TOL", 0.0)
    with pytest.raises(export.ParityError):
        export.export_run(run, repo, "m", log=quiet)
    assert not repo.exists()


def test_cli_exports_and_reports(make_run, repo, capsys):
    run, _, _ = make_run("sine-run", cell="gru", metrics={"val_rmse": 0.5})
    assert cli_main(["export", str(run), "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "T=300" in out and "chained" in out and "wrote" in out
    info = artifact.load_model_info(repo / "sine-run" / "1" / "model.onnx")
    assert (info.name, info.version, info.metrics) == ("sine-run", 1, {"val_rmse": 0.5})


@pytest.mark.parametrize("argv, message", [
    (["export", "{tmp}/nowhere", "--name", "m"], "checkpoint.pt not found"),
    (["export", "{run}", "--name", "bad name!"], "invalid model name"),
    (["export", "{run}", "--name", "m", "--version", "0"], "version must be a positive integer"),
])
def test_cli_bad_input_is_one_line(make_run, tmp_path, capsys, argv, message):
    run, _, _ = make_run()
    argv = [a.format(tmp=tmp_path, run=run) for a in argv] + ["--repo", str(tmp_path / "r")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_exported_file_runs_the_numbers_in_raw_units(make_run, repo):
    """A client sending raw values gets raw values: y tracks the series' scale."""
    import onnxruntime as ort

    run, model, ckpt = make_run(cell="lstm")
    path = export.export_run(run, repo, "m", log=quiet)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.full((1, 4, 2), [120.0, -0.5], np.float32)  # exactly the mean: normalised input is 0
    zeros = np.zeros((1, 1, 8), np.float32)
    y = sess.run(["y"], {"x": x, "h0": zeros, "c0": zeros})[0]
    # the head's output around 0 in model units is mapped back near the means
    assert np.all(np.abs(y[..., 0] - 120.0) < 40.0 * 5) and np.all(np.abs(y[..., 1] + 0.5) < 0.25 * 5)
    assert np.abs(y[..., 0]).min() > 10  # de-normalised, not left in model units


def test_concurrent_exports_take_distinct_versions(make_run, repo):
    """Two writers racing for the next version never overwrite each other."""
    run, model, ckpt = make_run()
    payloads = [export.build_onnx(model, ckpt, source_run=f"writer-{i}").SerializeToString() for i in range(4)]
    barrier = threading.Barrier(len(payloads))
    paths, errors = [], []

    def writer(data):
        barrier.wait()
        try:
            paths.append(export.publish(repo, "m", data))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert artifact.versions(repo, "m") == [1, 2, 3, 4]
    assert sorted(p.read_bytes() for p in paths) == sorted(payloads)


def test_export_model_writes_a_gated_file(new_model, tmp_path):
    model, ckpt = new_model(cell="gru", layers=2)
    path = tmp_path / "single.onnx"
    report = export.export_model(model, ckpt, path, source_run="notebook")
    assert report["passed"] and set(report["checks"]) >= {"batch=2 T=300", "chained 12x T=1"}
    info = artifact.load_model_info(path)
    assert (info.cell, info.layers, info.source_run) == ("gru", 2, "notebook")
    # the gate reads the statistics from the file itself when not told them
    assert export.check_parity(model, path.read_bytes())["passed"]
    assert [p.name for p in tmp_path.iterdir()] == ["single.onnx"]


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert cli_main(["export", str(run), "--repo", str(tmp_path / "r"), "--name", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load checkpoint" in err[0]
