"""A small sentiment run: run folder, metrics, and an export a server can use."""
import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from seqserve.artifact import read_metadata
from seqserve.text import Tokenizer, pad_batch
from training import classify
from training.export import export_run
from training.model import load_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("s3") / "run"
    args = argparse.Namespace(task="sentiment3", cell="gru", out=str(out), max_examples=400, epochs=2,
                              hidden=16, embed_dim=8, layers=1, progress=False, seed=0, budget_s=None)
    classify.run(args)
    return out


def test_run_folder_and_metrics(run_dir):
    for name in ("checkpoint.pt", "metrics.json", "loss.png", "accuracy_by_length.png"):
        assert (run_dir / name).is_file(), name
    m = json.loads((run_dir / "metrics.json").read_text())
    sizes = m["sizes"]
    assert sizes["train"] + sizes["val"] + sizes["test"] == 400 and abs(sizes["test"] - 40) <= 2
    n_test = sizes["test"]
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert m["majority_class"] in ("negative", "neutral", "positive")
    buckets = m["accuracy_by_length"]
    assert sum(b["n"] for b in buckets.values()) == n_test
    assert sum(sum(r) for r in m["confusion"]["counts"]) == n_test
    # The per-bucket counts weight back to the overall accuracy.
    correct = sum(b["accuracy"] * b["n"] for b in buckets.values() if b["n"])
    assert correct / n_test == pytest.approx(m["test_accuracy"])


def test_checkpoint_carries_text_pipeline(run_dir):
    model, ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt.normalization is None
    assert ckpt.extra["labels"] == ["negative", "neutral", "positive"]
    tok = Tokenizer.from_metadata(ckpt.extra["tokenizer"], ckpt.extra["vocab"])
    assert model.config.vocab_size == len(tok.vocab)
    assert model.config.head == "classify" and model.config.output_size == 3


def test_exported_model_classifies_raw_text_like_torch(run_dir, tmp_path):
    path = export_run(run_dir, repo=tmp_path / "repo", name="s3-gru", log=lambda *_: None)
    proto = onnx.load(str(path))
    meta = read_metadata(proto)
    assert meta["labels"] == ["negative", "neutral", "positive"]
    tok = Tokenizer.from_metadata(meta["tokenizer"], meta["vocab"])
    texts = ["I love this so much!", "worst day ever, the car broke", "ok"]
    rows, lengths = pad_batch([tok.encode(t) for t in texts])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model, _ = load_checkpoint(run_dir / "checkpoint.pt")
    for i, text in enumerate(texts):
        ids = np.array([tok.encode(text)], dtype=np.int64)  # (1, T)
        feeds = {"x": ids, "h0": np.zeros((1, 1, 16), np.float32)}
        y = sess.run(["y"], feeds)[0]  # (1, T, 3)
        with torch.no_grad():
            want = classify.last_logits(model, torch.tensor(rows), torch.tensor(lengths))[i]
        np.testing.assert_allclose(y[0, -1], want.numpy(), atol=1e-4)
