"""Fixtures for export tests: small random-weight models saved as run folders.

No training: a SequenceModel with seeded random weights is as good a subject for
the exporter as a trained one, and takes milliseconds.
"""
from __future__ import annotations

import json

import pytest
import torch

from training.model import Checkpoint, ModelConfig, SequenceModel, save_checkpoint

torch.set_num_threads(1)

LABELS = ["neg", "neu", "pos"]


def make_model(cell="lstm", layers=1, bidirectional=False, tokens=False, hidden=8, features=2,
               seed=0, normalization=True):
    """(model, checkpoint): float forecasting (normalised) or token classifier."""
    torch.manual_seed(seed)
    if tokens:
        cfg = ModelConfig(cell=cell, vocab_size=40, embed_dim=6, hidden=hidden, layers=layers,
                          bidirectional=bidirectional, head="classify", output_size=len(LABELS))
        norm = None
        extra = {"labels": LABELS, "vocab": [f"w{i}" for i in range(40)],
                 "tokenizer": {"lowercase": True, "unk": 1, "pad": 0}}
    else:
        cfg = ModelConfig(cell=cell, input_size=features, hidden=hidden, layers=layers,
                          bidirectional=bidirectional, head="regression", output_size=features)
        # a series in the hundreds and one near zero: the in-graph affine steps must be exact
        norm = {"mean": [120.0, -0.5][:features], "std": [40.0, 0.25][:features]} if normalization else None
        extra = {"columns": ["level", "rate"][:features]}  # as training/train.py stores them
    model = SequenceModel(cfg).eval()
    ckpt = Checkpoint(model=cfg.to_dict(), task={"name": "unit"},
                      train={"epochs": 0}, normalization=norm, extra=extra,
                      metrics={"val_loss": 0.125})
    return model, ckpt


@pytest.fixture
def make_run(tmp_path):
    """make_run(name, **make_model kwargs) -> (run_dir, model, ckpt), saved like `seqserve train`."""

    def _make(name="run", metrics=None, **kwargs):
        model, ckpt = make_model(**kwargs)
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        save_checkpoint(run / "checkpoint.pt", model, ckpt)
        if metrics is not None:
            (run / "metrics.json").write_text(json.dumps(metrics))
        return run, model, ckpt

    return _make


@pytest.fixture
def repo(tmp_path):
    return tmp_path / "model_repository"


@pytest.fixture
def new_model():
    """new_model(**make_model kwargs) -> (model, checkpoint)."""
    return make_model


# worst ORT-vs-PyTorch max-abs per cell over the parity grid, shown after the run
_PARITY_WORST: dict[str, tuple[float, str]] = {}


@pytest.fixture
def parity_log():
    """parity_log(cell, err, case): keep the worst error per cell for the summary."""

    def _log(cell, err, case):
        if err >= _PARITY_WORST.get(cell, (-1.0, ""))[0]:
            _PARITY_WORST[cell] = (float(err), case)

    return _log


def pytest_terminal_summary(terminalreporter):
    if _PARITY_WORST:
        terminalreporter.write_sep("-", "export parity: worst ONNX Runtime vs PyTorch max-abs per cell")
        for cell, (err, case) in sorted(_PARITY_WORST.items()):
            terminalreporter.write_line(f"{cell:<5} {err:.3e}  ({case})")
