"""`seqserve train`: bad input is one line and a non-zero exit; tasks route; defaults fill in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seqserve.cli import main
from training import cli, train
from training.model import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def refused(capsys, argv):
    rc = main(["train", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("seqserve train: error: ")
    return lines[0]


@pytest.mark.parametrize("argv,expected", [
    (["--task", "weather"], "unknown task 'weather'"),
    (["--task", "sine", "--cell", "transformer"], "unknown cell 'transformer'"),
    (["--task", "sine", "--hidden", "0"], "--hidden must be positive, got 0"),
    (["--task", "sine", "--layers", "-2"], "--layers must be positive, got -2"),
    (["--task", "sine", "--epochs", "0"], "--epochs must be positive"),
    (["--task", "sine", "--batch-size", "0"], "--batch-size must be positive"),
    (["--task", "sine", "--window", "-1"], "--window must be positive"),
    (["--task", "sine", "--lr", "0"], "--lr must be positive"),
    (["--task", "sine", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--task", "sine", "--hidden", "many"], "invalid int value: 'many'"),
    (["--task", "sine", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--task", "sine", "--bidirectional"], "--bidirectional reads the future"),
    (["--task", "csv"], "task csv needs --csv FILE"),
])
def test_bad_input_is_one_line(capsys, tmp_path, argv, expected):
    assert expected in refused(capsys, [*argv, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists() or expected.startswith("--bidirectional")


def test_missing_out_and_out_that_is_a_file(capsys, tmp_path):
    assert "required: --out" in refused(capsys, ["--task", "sine"])
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in refused(capsys, ["--task", "sine", "--out", str(tmp_path / "file")])
    assert "is not a folder" in refused(capsys, ["--task", "sine", "--out", str(tmp_path / "file" / "run")])


def test_bad_csv_is_refused_naming_row_and_column(capsys, tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("level,rate\n1,2\n3,x\n")
    line = refused(capsys, ["--task", "csv", "--csv", str(f), "--columns", "level,rate",
                            "--out", str(tmp_path / "run")])
    assert "row 2 (line 3), column 'rate': 'x' is not a number" in line
    line = refused(capsys, ["--task", "csv", "--csv", str(f), "--columns", "level,speed",
                            "--out", str(tmp_path / "run")])
    assert "column 'speed' not in header" in line
    line = refused(capsys, ["--task", "csv", "--csv", str(tmp_path / "none.csv"), "--columns", "a",
                            "--out", str(tmp_path / "run")])
    assert "none.csv" in line


def test_console_entry_point_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "seqserve.cli", "train", "--task", "sine", "--cell", "lstmx",
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == ("seqserve train: error: unknown cell 'lstmx': choose one of rnn, lstm, gru")


def test_help_exits_zero(capsys):
    assert main(["train", "--help"]) == 0
    assert "--window" in capsys.readouterr().out


def test_task_table_routes_every_task():
    assert set(cli.RUNNERS) >= {"sine", "sunspots", "co2", "csv", "sentiment2", "sentiment3", "adding",
                                "ner", "lm"}
    for task, target in cli.RUNNERS.items():
        module, func = target.split(":")
        spec_file = ROOT / (module.replace(".", "/") + ".py")
        if spec_file.exists():  # runners other engineers own may land later
            assert callable(cli.load_runner(task)[1]), task


def test_defaults_fill_in_and_flags_win():
    args = cli.build_parser().parse_args(["--task", "sunspots", "--out", "x", "--hidden", "9"])
    cli.fill_defaults(args, train)
    assert args.hidden == 9  # given
    assert args.window == train.DEFAULTS["sunspots"]["window"]  # the task's default
    assert args.min_freq == cli.COMMON_DEFAULTS["min_freq"]  # the common default

    class Flat:  # a runner module with flat DEFAULTS
        DEFAULTS = {"hidden": 128, "epochs": 12}

    args = cli.build_parser().parse_args(["--task", "sentiment2", "--out", "x", "--epochs", "1"])
    cli.fill_defaults(args, Flat)
    assert args.hidden == 128 and args.epochs == 1 and args.layers == cli.COMMON_DEFAULTS["layers"]


def test_multivariate_csv_end_to_end(capsys, tmp_path):
    t = np.arange(300)
    f = tmp_path / "plant.csv"
    rows = [f"{i},{10 + np.sin(i / 6):.5f},{100 * np.cos(i / 6):.4f}" for i in t]
    f.write_text("step,temp,flow\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    rc = main(["train", "--task", "csv", "--csv", str(f), "--columns", "temp,flow", "--window", "16",
               "--hidden", "8", "--epochs", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_column"]) == {"temp", "flow"}
    model, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert model.config.input_size == model.config.output_size == 2
    assert ckpt.extra["columns"] == ["temp", "flow"] and len(ckpt.normalization["std"]) == 2
    assert ckpt.normalization["mean"][1] == pytest.approx(100 * np.cos(t[:210] / 6).mean(), abs=1e-3)
    assert metrics["rollout_steps"] == 45  # limited by the 45-row test segment
