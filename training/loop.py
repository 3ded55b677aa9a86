"""A generic training loop every seqserve task plugs into.

A task supplies two callables and the loop does the rest:
  train_batches(epoch) -> iterable of batches  (the task shuffles, seeded by epoch)
  loss_fn(model, batch) -> scalar tensor        (batch already moved to the device)
and optionally
  val_fn(model) -> float                        (called in eval mode under no_grad)

What the loop does: AdamW, gradient-norm clipping (the remedy for exploding
gradients in recurrent nets), early stopping on validation loss with the best
weights restored, an optional wall-clock budget, a tqdm bar with live
train/val loss, and a History of what happened.

    seed_everything(0)
    history = fit(model, lambda e: batches(e), loss_fn,
                  val_fn=lambda m: evaluate(m, val_batches, loss_fn),
                  epochs=20, lr=1e-3, patience=5)
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    # cuDNN picks kernels by timing unless told not to; that breaks repeatability.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto": CUDA when present, else CPU. An unusable choice is a ValueError."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda")
    return dev


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside a (nested) tuple/list/dict batch to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [to_device(b, device) for b in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, loss_fn: Callable) -> float:
    """Mean of loss_fn over `batches` in eval mode (dropout off), on the model's device."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, n = 0.0, 0
    for batch in batches:
        total += float(loss_fn(model, to_device(batch, device)))
        n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: no batches to evaluate")
    return total / n


@dataclass
class History:
    """What fit() did; JSON-friendly via to_dict()."""

    train_loss: list[float] = field(default_factory=list)
    """Mean training loss of each epoch (a budget-cut last epoch counts its batches so far)."""
    val_loss: list[float] = field(default_factory=list)
    """Validation loss after each epoch; empty without val_fn."""
    epochs: int = 0
    """Epochs run (a budget-cut last epoch counts)."""
    best_epoch: int = 0
    """1-based epoch whose weights the model holds at the end (the last one without val_fn)."""
    best_val_loss: float | None = None
    seconds: float = 0.0
    """Wall-clock time of the whole fit, validation included."""
    stopped: str = "epochs"
    """Why it stopped: epochs | patience | budget | non-finite."""
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterable],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    val_fn: Callable[[nn.Module], float] | None = None,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    clip: float | None = 1.0,
    patience: int | None = None,
    budget_s: float | None = None,
    seed: int | None = None,
    schedule: str = "constant",
    device: str | torch.device | None = None,
    desc: str = "train",
    progress: bool = True,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
) -> History:
    """Train `model` in place and return its History.

    epochs: upper bound on passes over train_batches(epoch), epoch = 0, 1, ...
    clip: max global gradient norm (None or <= 0: no clipping).
    patience: stop after this many epochs without a new best validation loss
        (None: never stop early). With val_fn the best weights are restored.
    budget_s: stop once this many wall-clock seconds have passed (checked
        after every batch); the partial epoch is still validated.
    seed: when given, seed_everything(seed) before the optimizer is built.
    schedule: "constant" lr, or "cosine": lr * (1 + cos(pi * epoch / epochs)) / 2
        per epoch, so the last epochs take small, precise steps.
    on_epoch(epoch, train_loss, val_loss): called after each epoch (1-based).
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if budget_s is not None and budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}: constant or cosine")
    if seed is not None:
        seed_everything(seed)
    dev = pick_device(device)
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    hist = History(device=str(dev))
    best_state, best_val, bad_epochs = None, math.inf, 0
    start = time.perf_counter()
    out_of_time = lambda: budget_s is not None and time.perf_counter() - start >= budget_s

    bar = tqdm(total=epochs, desc=desc, unit="epoch", disable=not progress, leave=True, dynamic_ncols=True)
    try:
        for epoch in range(epochs):
            if schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
            model.train()
            total, n, finite = 0.0, 0, True
            for batch in train_batches(epoch):
                loss = loss_fn(model, to_device(batch, dev))
                if not torch.isfinite(loss):
                    finite = False
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None and clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                total += float(loss.detach())
                n += 1
                if n % 10 == 0:  # tqdm throttles redraws itself; this just feeds it
                    bar.set_postfix(_postfix(total / n, hist.val_loss), refresh=False)
                if out_of_time():
                    break
            if not finite:
                hist.stopped = "non-finite"
                break
            if n == 0:
                raise ValueError("train_batches yielded no batches")
            hist.epochs = epoch + 1
            hist.train_loss.append(total / n)
            val = None
            if val_fn is not None:
                model.eval()
                with torch.no_grad():
                    val = float(val_fn(model))
                model.train()
                hist.val_loss.append(val)
                if val < best_val:  # NaN never compares smaller, so it is never "best"
                    best_val, bad_epochs, hist.best_epoch = val, 0, epoch + 1
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1
            else:
                hist.best_epoch = epoch + 1
            bar.set_postfix(_postfix(total / n, hist.val_loss), refresh=False)
            bar.update(1)
            if on_epoch is not None:
                on_epoch(epoch + 1, total / n, val)
            if out_of_time():
                hist.stopped = "budget"
                break
            if patience is not None and val_fn is not None and bad_epochs >= patience:
                hist.stopped = "patience"
                break
    finally:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
        hist.best_val_loss = best_val
    model.eval()
    hist.seconds = time.perf_counter() - start
    return hist


def _postfix(train: float, val: list[float]) -> dict:
    post = {"train": f"{train:.4g}"}
    if val:
        post["val"] = f"{val[-1]:.4g}"
    return post


def default_threads() -> int:
    """Threads torch should use on CPU: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
