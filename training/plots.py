"""PNG plots of a training run: loss curves and forecasts (matplotlib, no display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_plot(train_loss: list[float], val_loss: list[float], path: str | Path, *,
              title: str, ylabel: str = "loss (MSE, normalised)", best_epoch: int | None = None) -> None:
    """Train and validation loss per epoch on one log-scaled plot."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    epochs = np.arange(1, len(train_loss) + 1)
    ax.plot(epochs, train_loss, marker="o", ms=3, label="train")
    if val_loss:
        ax.plot(np.arange(1, len(val_loss) + 1), val_loss, marker="o", ms=3, label="validation")
    if best_epoch:
        ax.axvline(best_epoch, color="grey", ls=":", lw=1, label=f"best epoch ({best_epoch})")
    positive = [v for v in list(train_loss) + list(val_loss) if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def forecast_plot(path: str | Path, *, title: str, time_label: str, columns: list[str], units: str,
                  t: np.ndarray, truth: np.ndarray, one_step: np.ndarray,
                  t_roll: np.ndarray, rollout: np.ndarray, one_step_rmse: float, rollout_rmse: float) -> None:
    """Truth vs one-step predictions (top) and vs a closed-loop rollout (bottom).

    truth, one_step: (T, F) over times t; rollout: (H, F) over times t_roll,
    all in the series' own units. Each feature gets its own pair of panels.
    """
    F = truth.shape[1]
    fig, axes = plt.subplots(2 * F, 1, figsize=(10, 3.2 * 2 * F), dpi=110, squeeze=False)
    ylabel = lambda col: f"{col} ({units})" if units else col
    for f, col in enumerate(columns):
        top, bottom = axes[2 * f, 0], axes[2 * f + 1, 0]
        top.plot(t, truth[:, f], color="black", lw=1.4, label="truth")
        top.plot(t, one_step[:, f], color="tab:blue", lw=1.1, ls="--", label="one-step prediction")
        top.set_title(f"{col}: one step ahead (test RMSE {one_step_rmse:.4g}, normalised)", fontsize=10)
        in_roll = (t >= t_roll[0]) & (t <= t_roll[-1])
        bottom.plot(t[in_roll], truth[in_roll, f], color="black", lw=1.4, label="truth")
        bottom.plot(t_roll, rollout[:, f], color="tab:red", lw=1.1, ls="--",
                    label=f"closed-loop rollout ({len(t_roll)} steps)")
        bottom.set_title(f"{col}: closed-loop rollout, each prediction fed back "
                         f"(RMSE {rollout_rmse:.4g}, normalised)", fontsize=10)
        for ax in (top, bottom):
            ax.set_xlabel(time_label)
            ax.set_ylabel(ylabel(col))
            ax.grid(True, alpha=0.3)
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
