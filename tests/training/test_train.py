"""training.loop.fit and the forecasting run folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from training.forecast import TaskConfig, batches, load_series, prepare, train_windows
from training.loop import History, evaluate, fit, pick_device, seed_everything
from training.model import ModelConfig, SequenceModel, load_checkpoint


def sine_setup(cell="lstm", seed=0):
    data = prepare(TaskConfig(name="sine", window=16, length=600, seed=1))
    X, Y = train_windows(data)
    seed_everything(seed)
    model = SequenceModel(ModelConfig(cell=cell, hidden=12, layers=1))
    return model, X, Y


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x)[0], y)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_short_run_lowers_the_loss(cell):
    model, X, Y = sine_setup(cell)
    val = list(batches(X[::7], Y[::7], 256, 0, 0))
    before = evaluate(model, val, mse)
    hist = fit(model, lambda e: batches(X, Y, 32, 0, e), mse, val_fn=lambda m: evaluate(m, val, mse),
               epochs=3, lr=1e-2, progress=False)
    after = evaluate(model, val, mse)
    assert after < 0.5 * before
    assert hist.epochs == 3 and len(hist.train_loss) == len(hist.val_loss) == 3
    assert hist.train_loss[-1] < hist.train_loss[0]
    assert hist.best_val_loss == pytest.approx(after, rel=1e-5)  # best weights are what it holds


def weights_after_fit(seed, schedule="constant"):
    model, X, Y = sine_setup("gru", seed=seed)
    fit(model, lambda e: batches(X[:256], Y[:256], 64, seed, e), mse, epochs=2, lr=1e-2, seed=seed,
        schedule=schedule, progress=False)
    return [p.detach().clone() for p in model.parameters()]


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = weights_after_fit(5), weights_after_fit(5), weights_after_fit(6)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    cosine = weights_after_fit(5, schedule="cosine")  # epoch 2 at half the lr: other weights
    assert not all(torch.equal(p, q) for p, q in zip(a, cosine))


def test_early_stopping_restores_the_best_weights():
    model, X, Y = sine_setup()
    val_losses = iter([3.0, 1.0, 2.0, 2.5, 0.5, 9.0])  # best at epoch 2; patience 2 stops at 4
    snapshots = {}

    def on_epoch(epoch, train, val):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    hist = fit(model, lambda e: batches(X[:64], Y[:64], 32, 0, e), mse, val_fn=lambda m: next(val_losses),
               epochs=6, lr=1e-2, patience=2, on_epoch=on_epoch, progress=False)
    assert hist.stopped == "patience" and hist.epochs == 4 and hist.best_epoch == 2
    assert hist.val_loss == [3.0, 1.0, 2.0, 2.5] and hist.best_val_loss == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[2][k]), k
    assert not all(torch.equal(v, snapshots[4][k]) for k, v in model.state_dict().items())


def test_budget_stops_inside_the_first_epoch():
    model, X, Y = sine_setup()
    calls = []

    def slow_batches(epoch):
        for b in batches(X, Y, 8, 0, epoch):
            calls.append(1)
            yield b

    hist = fit(model, slow_batches, mse, val_fn=lambda m: 1.0, epochs=50, budget_s=1e-3, progress=False)
    assert hist.stopped == "budget" and hist.epochs == 1 and len(calls) < len(X) // 8
    assert len(hist.val_loss) == 1  # the partial epoch is still validated


def test_non_finite_loss_stops_and_keeps_the_best_weights():
    model, X, Y = sine_setup()
    losses = iter([1.0])

    def loss(m, batch):
        return mse(m, batch) * (1 if next(losses, None) else float("nan"))

    hist = fit(model, lambda e: batches(X[:8], Y[:8], 8, 0, e), loss, val_fn=lambda m: 0.5, epochs=5,
               progress=False)
    assert hist.stopped == "non-finite" and hist.epochs == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fit_and_device_refusals():
    model, X, Y = sine_setup()
    with pytest.raises(ValueError, match="epochs"):
        fit(model, lambda e: [], mse, epochs=0)
    with pytest.raises(ValueError, match="no batches"):
        fit(model, lambda e: [], mse, epochs=1, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        fit(model, lambda e: [], mse, epochs=1, schedule="linear", progress=False)
    with pytest.raises(ValueError):
        pick_device("tpu")
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device(None).type == "cpu"
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
    assert isinstance(History().to_dict(), dict)


# ------------------------------------------------------------ the run folder


def test_run_folder_holds_checkpoint_metrics_and_plots(tiny_sine_run):
    out, metrics = tiny_sine_run
    for name in ("checkpoint.pt", "metrics.json", "loss.png", "forecast.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("loss.png", "forecast.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("train_loss", "val_loss", "test_loss", "test_rmse", "test_mae", "test_rmse_norm",
                "persistence_rmse", "persistence_mae", "persistence_rmse_norm", "rollout_rmse",
                "rollout_rmse_norm", "rollout_steps", "parameters", "train_seconds"):
        assert np.isfinite(metrics[key]), key
    assert metrics["rollout_steps"] == 100 and metrics["epochs_run"] == 2
    assert len(metrics["history"]["train_loss"]) == 2


def test_checkpoint_rebuilds_the_model_and_reproduces_the_metrics(tiny_sine_run):
    """Independent recomputation from the checkpoint alone: regenerate the series
    from the stored task config, normalise with the stored statistics, stream the
    test segment through the rebuilt model, and score it and the persistence baseline."""
    out, metrics = tiny_sine_run
    model, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.model["cell"] == "gru" and ckpt.model["hidden"] == 8
    assert ckpt.task["name"] == "sine" and ckpt.task["window"] == 16 and ckpt.task["seed"] == 3
    assert ckpt.train["epochs"] == 2 and ckpt.train["optimizer"] == "AdamW"
    series = load_series(TaskConfig.from_dict({k: v for k, v in ckpt.task.items() if k != "kind"}))
    raw = series.values[:, 0]
    n = len(raw)
    n_test = round(0.15 * n)
    test_start = n - n_test
    train = raw[: n - 2 * n_test]
    mean, std = ckpt.normalization["mean"][0], ckpt.normalization["std"][0]
    assert mean == pytest.approx(train.mean()) and std == pytest.approx(train.std())
    z = (raw - mean) / std
    x = torch.tensor(z[test_start - 16: n - 1], dtype=torch.float32)[None, :, None]
    with torch.no_grad():
        pred = model(x)[0][0, 15:, 0].numpy()
    truth = z[test_start:]
    rmse = np.sqrt(np.mean((pred - truth) ** 2))
    assert rmse == pytest.approx(metrics["test_rmse_norm"], rel=1e-4)
    assert np.sqrt(np.mean((raw[test_start - 1:-1] - raw[test_start:]) ** 2)) == pytest.approx(
        metrics["persistence_rmse"], rel=1e-6)
    assert json.loads((out / "metrics.json").read_text())["test_rmse"] == pytest.approx(rmse * std, rel=1e-4)
