"""Shared fixtures for the training tests; one torch thread keeps the shared CPU usable."""
from __future__ import annotations

import json

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sine_run(tmp_path_factory):
    """A real `seqserve train --task sine` run, shrunk to seconds; returns (run_dir, metrics)."""
    from seqserve.cli import main

    # runs/ does not exist yet, as in a fresh clone: train creates it
    out = tmp_path_factory.mktemp("clone") / "runs" / "sine-tiny"
    rc = main(["train", "--task", "sine", "--cell", "gru", "--hidden", "8", "--window", "16",
               "--epochs", "2", "--batch-size", "128", "--seed", "3", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "metrics.json").read_text())
