"""The adding problem: a long-range memory probe for RNN, LSTM and GRU.

Each sequence has `lag` steps of 2 features: a value drawn from U(0, 1) and a
marker that is 1 at exactly two steps (one in the first half, one in the
second) and 0 elsewhere. The target, read at the LAST step, is the sum of the
two marked values. The first marked value lies between lag/2 and lag steps
before the answer, so the model must carry it that far. Always answering 1
(the mean sum) scores MSE = Var(U1 + U2) = 2/12 ~ 0.167: the trivial predictor.

Gradient flow: the norm of dLoss/dh_t (top layer's output at step t, batch
mean) against the distance lag-1-t from the loss, the quantity the vanishing
gradient derivation says shrinks like a product of tanh' * W_hh factors.

Run folder: checkpoint.pt, metrics.json, loss.png, gradients.png.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training.loop import fit, seed_everything
from training.model import Checkpoint, ModelConfig, SequenceModel, count_parameters, save_checkpoint

STOP_MSE = 0.002  # a solved run stops here (the target is 0.01) to save the shared CPU
TRIVIAL_MSE = 1.0 / 6.0  # Var(U1 + U2) for U ~ U(0, 1): predicting the mean 1.0
LAGS = (10, 50, 100, 200)
DEFAULTS = dict(cell="lstm", layers=1, hidden=64, lr=3e-3, batch_size=64, epochs=100,
                steps_per_epoch=50, lag=100)


class _Stop(Exception):
    """Raised from fit's epoch callback: solved, or out of CPU budget."""


def generate(n: int, lag: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of length lag -> x (n, lag, 2) float32, target (n,) float32."""
    if lag < 2:
        raise ValueError(f"lag must be >= 2, got {lag}")
    values = torch.rand(n, lag, generator=generator)  # (n, lag)
    half = lag // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, lag, (n,), generator=generator)
    marker = torch.zeros(n, lag)
    rows = torch.arange(n)
    marker[rows, first] = 1.0
    marker[rows, second] = 1.0
    x = torch.stack([values, marker], dim=-1)  # (n, lag, 2)
    target = values[rows, first] + values[rows, second]
    return x, target


def loss_fn(model, batch) -> torch.Tensor:
    x, target = batch
    y, _ = model(x)  # (B, lag, 1)
    return F.mse_loss(y[:, -1, 0], target)


@torch.no_grad()
def mse(model, x, target, batch_size: int = 500) -> float:
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for s in range(0, len(x), batch_size):
        y, _ = model(x[s:s + batch_size].to(device))
        total += float(((y[:, -1, 0].cpu() - target[s:s + batch_size]) ** 2).sum())
    return total / len(x)


def gradient_norms(model: SequenceModel, x: torch.Tensor, target: torch.Tensor) -> list[float]:
    """||dLoss/dh_t|| (mean over the batch) for t = 0..T-1 of the top layer.

    The recurrent module runs one step at a time and the next step reads the
    top layer's step output itself, so that tensor's gradient is the full
    dL/dh_t (through every later step and the head). Hooking the output of
    one whole-sequence call would NOT do: torch's fused recurrence reads its
    own internal copy of h, and the output sequence's grad is then zero at
    every step but the one the loss reads. Dropout is off (eval mode).
    """
    if model.config.bidirectional:
        raise ValueError("gradient flow is measured on one-way models")
    lstm = model.config.cell == "lstm"
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.enable_grad():
            state = None
            for t in range(x.shape[1]):
                out, state = model.rnn(x[:, t:t + 1], state)  # out (B, 1, H)
                out.retain_grad()
                outs.append(out)
                top = out.transpose(0, 1)  # (1, B, H): the top layer's h_t
                if lstm:
                    state = (torch.cat([state[0][:-1], top]), state[1])
                else:
                    state = torch.cat([state[:-1], top])
            y = model.head(outs[-1])[:, 0, 0]  # (B,)
            F.mse_loss(y, target).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return [float(o.grad[:, 0].norm(dim=-1).mean()) for o in outs]  # step t -> distance T-1-t


def init_model(cell: str, hidden: int, layers: int, seed: int) -> SequenceModel:
    """The untrained model train_adding starts from (same seed, same weights)."""
    seed_everything(seed)
    return SequenceModel(ModelConfig(cell=cell, input_size=2, hidden=hidden, layers=layers,
                                     head="regression", output_size=1))


def save_run(out, model: SequenceModel, metrics: dict, cfg: dict) -> None:
    """checkpoint.pt, metrics.json and loss.png of one (cell, lag) run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(model=model.config.to_dict(), task=cfg["task"], train=cfg["train"],
                      normalization=None, extra={"output_names": ["sum"]},
                      metrics={k: v for k, v in metrics.items() if k not in ("history", "gradient_norms")})
    save_checkpoint(out / "checkpoint.pt", model, ckpt)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from training.classify import plot_losses
    h = metrics["history"]
    plot_losses({metrics["cell"]: {"train": h["train_loss"], "val": h["val_loss"]}}, out / "loss.png",
                f"adding problem, lag {metrics['lag']}: MSE per epoch ({metrics['cell']})", "MSE")


def train_adding(cell: str, lag: int, *, hidden: int = 64, layers: int = 1, lr: float = 3e-3,
                 batch_size: int = 64, epochs: int = 100, steps_per_epoch: int = 50,
                 budget_s: float | None = None, seed: int = 0, device=None, progress: bool = True,
                 n_val: int = 1000, n_test: int = 2000,
                 stop_mse: float | None = STOP_MSE, budget_kind: str = "wall",
                 wall_cap_s: float | None = None) -> tuple[SequenceModel, dict, dict]:
    """Train one cell on one lag with fresh data every batch.

    Returns the model, metrics and the task config. Validation and test sets
    are fixed by seed (test: its own generator, never seen in training).
    Validation keeps the best weights; there is no early stop on patience,
    because these models sit on the trivial plateau for a while before they
    find the markers. Training stops once validation MSE <= stop_mse.
    """
    model = init_model(cell, hidden, layers, seed)
    train_gen = torch.Generator().manual_seed(seed * 7919 + lag)
    val = generate(n_val, lag, torch.Generator().manual_seed(10_000 + seed))
    test = generate(n_test, lag, torch.Generator().manual_seed(20_000 + seed))

    def train_batches(epoch):
        for _ in range(steps_per_epoch):
            yield generate(batch_size, lag, train_gen)

    # fit() keeps the best validation weights when it ends by itself. To stop
    # as soon as the task is solved (val MSE <= stop_mse), or when this
    # process has used budget_s CPU seconds (budget_kind "cpu": fair between
    # cells on a shared, busy machine), the epoch callback leaves fit by an
    # exception and the best weights seen are restored here.
    history = {"train_loss": [], "val_loss": [], "epochs": 0, "stopped": "epochs", "cpu_seconds": []}
    best = {"val": math.inf, "state": None}
    cpu0 = time.process_time()

    def on_epoch(epoch, train_loss, val_loss):
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        history["epochs"] = epoch
        history["cpu_seconds"].append(round(time.process_time() - cpu0, 2))
        if val_loss < best["val"]:
            best["val"], best["state"] = val_loss, copy.deepcopy(model.state_dict())
        if stop_mse is not None and val_loss <= stop_mse:
            raise _Stop("solved")
        if budget_kind == "cpu" and budget_s is not None and time.process_time() - cpu0 >= budget_s:
            raise _Stop("budget")

    if budget_kind not in ("wall", "cpu"):
        raise ValueError(f"budget_kind must be wall or cpu, got {budget_kind!r}")
    wall_budget = budget_s if budget_kind == "wall" else wall_cap_s
    t0 = time.perf_counter()
    try:
        h = fit(model, train_batches, loss_fn, val_fn=lambda m: mse(m, *val), epochs=epochs, lr=lr,
                clip=1.0, patience=None, budget_s=wall_budget, seed=seed, device=device,
                desc=f"adding lag={lag} {cell}", progress=progress, on_epoch=on_epoch)
        history["stopped"] = h.stopped
    except _Stop as stop:
        history["stopped"] = str(stop)
        model.load_state_dict(best["state"])
    history["seconds"] = time.perf_counter() - t0
    history["best_val_loss"] = best["val"]
    model.cpu().eval()
    test_mse = mse(model, *test)
    metrics = {
        "task": "adding", "cell": cell, "lag": lag, "hidden": hidden, "layers": layers,
        "test_mse": test_mse, "trivial_mse": TRIVIAL_MSE,
        "solved": test_mse <= 0.01,
        "parameters": count_parameters(model),
        "recurrent_parameters": count_parameters(model.rnn),
        "train_seconds": history["seconds"],
        "train_cpu_seconds": history["cpu_seconds"][-1] if history["cpu_seconds"] else 0.0,
        "budget": {"kind": budget_kind, "seconds": budget_s, "wall_cap_s": wall_cap_s},
        "train_examples": history["epochs"] * steps_per_epoch * batch_size,
        "history": history,
    }
    task = {"name": "adding", "lag": lag, "seed": seed, "features": ["value", "marker"],
            "steps_per_epoch": steps_per_epoch}
    train = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "clip": 1.0, "budget_s": budget_s,
             "budget_kind": budget_kind, "seed": seed, "stop_mse": stop_mse}
    return model, metrics, {"task": task, "train": train}


def gradient_batch(lag: int, n: int = 256, seed: int = 0):
    """The one batch every cell's gradient flow is measured on."""
    return generate(n, lag, torch.Generator().manual_seed(30_000 + seed))


def plot_gradients(curves: dict[str, list[float]], path, title: str) -> None:
    """curves: {label: norms per step t}; x = distance from the loss, log y."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, norms) in enumerate(curves.items()):
        T = len(norms)
        dist = [T - 1 - t for t in range(T)]
        ys = [max(v, 1e-30) for v in norms]
        style = "--" if "init" in label else "-"
        ax.plot(dist, ys, style, color=f"C{i // 2 if len(curves) > 3 else i}", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("distance from the loss (steps before the last)")
    ax.set_ylabel("||dLoss / dh_t||  (batch mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    """`seqserve train --task adding --cell C [--lag N]`: one cell at one lag."""
    def arg(name):
        v = getattr(args, name, None)
        return DEFAULTS[name] if v is None else v

    cell, lag, seed = arg("cell"), int(arg("lag")), int(getattr(args, "seed", None) or 0)
    if getattr(args, "bidirectional", False):
        raise ValueError("--bidirectional is not meaningful for the adding problem (answer at the last step)")
    out = Path(getattr(args, "out", None) or f"runs/adding-{lag}-{cell}")
    out.mkdir(parents=True, exist_ok=True)
    x, target = gradient_batch(lag, seed=seed)
    init_norms = gradient_norms(init_model(cell, int(arg("hidden")), int(arg("layers")), seed), x, target)
    model, metrics, cfg = train_adding(
        cell, lag, hidden=int(arg("hidden")), layers=int(arg("layers")), lr=float(arg("lr")),
        batch_size=int(arg("batch_size")), epochs=int(arg("epochs")),
        steps_per_epoch=int(getattr(args, "steps_per_epoch", None) or DEFAULTS["steps_per_epoch"]),
        budget_s=getattr(args, "budget_s", None), seed=seed, device=getattr(args, "device", None),
        progress=bool(getattr(args, "progress", True)))
    trained_norms = gradient_norms(model, x, target)
    metrics["gradient_norms"] = {"at_init": init_norms, "trained": trained_norms}
    save_run(out, model, metrics, cfg)
    plot_gradients({f"{cell} at init": init_norms, f"{cell} trained": trained_norms},
                   out / "gradients.png", f"gradient flow, lag {lag} ({cell})")
    return metrics


def log_ratio(norms: list[float]) -> float:
    """log10(||dL/dh_first|| / ||dL/dh_last||): how many decades the gradient lost."""
    return math.log10(max(norms[0], 1e-30) / max(norms[-1], 1e-30))
