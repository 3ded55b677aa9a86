"""`seqserve bench cells` end to end (tiny budget: this checks the command, not speed)."""
from __future__ import annotations

import json

import pytest

from seqserve import bench, cli


def test_bench_cells_json(capsys):
    pytest.importorskip("torch")
    rc = cli.main(["bench", "cells", "--json", "--batches", "2", "--steps", "5", "--seconds", "0.01",
                   "--no-gpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out.strip().splitlines()[-1])
    assert {(r["engine"], r["batch"]) for r in rows} == {
        (e, b) for e in ("numba-cpu", "ort-run", "ort-iobinding", "torch") for b in (2,)}
    for r in rows:
        assert set(r) == {"engine", "batch", "step_us", "steps_per_s"}
        assert r["step_us"] > 0
        assert r["steps_per_s"] == pytest.approx(r["batch"] / (r["step_us"] * 1e-6), rel=0.01)
    assert "numba-cpu" in out.err and "vs numba-cpu" in out.err  # the table


@pytest.mark.parametrize("argv,message", [
    (["cells", "--batches", "0"], "--batches must be positive"),
    (["cells", "--batches", "a,b"], "comma-separated integers"),
])
def test_bench_cells_bad_arguments(capsys, argv, message):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_dispatcher_unknown_and_missing(capsys, monkeypatch):
    assert bench.main(["nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    monkeypatch.setitem(bench.TARGETS, "soak", ("serving.no_such_module_here", "x"))
    assert bench.main(["soak"]) == 2
    assert "not available here" in capsys.readouterr().err
    assert bench.main([]) == 2
