"""Many-to-one sentence classification: tasks sentiment2 and sentiment3.

The model emits class logits after every token, y (B, T, C); the loss reads
each sentence's LAST real token (padded batches are packed, so padding never
reaches it). The exported model therefore classifies a sentence as it is
typed: the last step's output is the sentence's class.

Run folder: checkpoint.pt, metrics.json (test accuracy, majority-class
baseline, accuracy per length bucket), loss.png, accuracy_by_length.png.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training.loop import evaluate, fit, seed_everything
from training.model import Checkpoint, ModelConfig, SequenceModel, count_parameters, save_checkpoint
from training.textdata import TASKS, TextSplits, load_text_task, majority_accuracy

# Token-count buckets for the accuracy-by-length figure (upper bounds, inclusive).
LENGTH_BUCKETS = (10, 20, 30, 40, 10_000)

# Defaults chosen for these corpora (flags override them when given).
DEFAULTS = dict(cell="lstm", layers=1, hidden=128, embed_dim=100, dropout=0.5, lr=2e-3,
                batch_size=64, epochs=15, min_freq=2, patience=4, word_dropout=0.25,
                weight_decay=1e-4)


def _arg(args, name):
    value = getattr(args, name, None)
    return DEFAULTS.get(name) if value is None else value


def bucket_name(upper_prev: int, upper: int) -> str:
    return f"{upper_prev + 1}+" if upper >= 10_000 else f"{upper_prev + 1}-{upper}"


def bucket_of(n: int) -> int:
    for i, upper in enumerate(LENGTH_BUCKETS):
        if n <= upper:
            return i
    return len(LENGTH_BUCKETS) - 1


def bucket_names() -> list[str]:
    prev = [0, *LENGTH_BUCKETS[:-1]]
    return [bucket_name(p, u) for p, u in zip(prev, LENGTH_BUCKETS)]


def collate(items, word_dropout: float = 0.0, rng: random.Random | None = None):
    """[(ids, label, text)] -> ids (B, T) int64, lengths (B,), labels (B,).

    word_dropout replaces that fraction of training tokens by <unk> (id 1), so
    the model learns what to do with words the vocabulary lacks.
    """
    T = max(len(ids) for ids, _, _ in items)
    x = torch.zeros(len(items), T, dtype=torch.long)  # 0 is <pad>
    for row, (ids, _, _) in enumerate(items):
        if word_dropout > 0 and rng is not None:
            ids = [1 if rng.random() < word_dropout else i for i in ids]
        x[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _, _ in items], dtype=torch.long)
    labels = torch.tensor([y for _, y, _ in items], dtype=torch.long)
    return x, lengths, labels


def batches(items, batch_size: int, shuffle_seed: int | None = None, word_dropout: float = 0.0):
    """Batches of similar length (less padding), in a seeded random order."""
    items = list(items)
    rng = random.Random(shuffle_seed)
    if shuffle_seed is not None:
        rng.shuffle(items)
    # Sort within chunks of 50 batches: near-equal lengths, still shuffled overall.
    chunk = batch_size * 50
    groups = []
    for s in range(0, len(items), chunk):
        part = sorted(items[s:s + chunk], key=lambda it: len(it[0]))
        groups.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    if shuffle_seed is not None:
        rng.shuffle(groups)
    return [collate(g, word_dropout, rng if shuffle_seed is not None else None) for g in groups]


def last_logits(model, x, lengths):
    """Logits at each row's last real token: (B, C)."""
    y, _ = model(x, lengths=lengths)  # (B, T, C)
    return y[torch.arange(x.shape[0], device=y.device), lengths.to(y.device) - 1]


def loss_fn(model, batch):
    x, lengths, labels = batch
    return F.cross_entropy(last_logits(model, x, lengths), labels)


@torch.no_grad()
def predict(model, items, batch_size: int = 256) -> list[int]:
    """Predicted class of each item, in order."""
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for s in range(0, len(items), batch_size):
        x, lengths, _ = collate(items[s:s + batch_size])
        preds.extend(last_logits(model, x.to(device), lengths).argmax(-1).tolist())
    return preds


def accuracy_by_length(items, preds, majority: int) -> dict:
    """{bucket: {"n", "accuracy", "majority_accuracy"}} over token counts."""
    names = bucket_names()
    rows = {n: [0, 0, 0] for n in names}  # count, correct, majority correct
    for (ids, y, _), p in zip(items, preds):
        r = rows[names[bucket_of(len(ids))]]
        r[0] += 1
        r[1] += int(p == y)
        r[2] += int(majority == y)
    return {n: {"n": c, "accuracy": (k / c if c else None),
                "majority_accuracy": (m / c if c else None)}
            for n, (c, k, m) in rows.items()}


def plot_accuracy_by_length(per_cell: dict[str, dict], path, title: str) -> None:
    """One line per cell: accuracy in each length bucket; dashed: majority class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = bucket_names()
    xs = list(range(len(names)))
    base = None
    for cell, buckets in per_cell.items():
        ys = [buckets[n]["accuracy"] for n in names]
        ax.plot(xs, [float("nan") if v is None else v for v in ys], marker="o", label=cell)
        base = buckets
    if base is not None:
        ys = [base[n]["majority_accuracy"] for n in names]
        ax.plot(xs, [float("nan") if v is None else v for v in ys], "k--", label="majority class")
        counts = [base[n]["n"] for n in names]
        names = [f"{n}\n(n={c})" for n, c in zip(names, counts)]
    ax.set_xticks(xs, names)
    ax.set_xlabel("sentence length (tokens)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(curves: dict[str, dict], path, title: str, ylabel: str = "loss") -> None:
    """curves: {label: {"train": [...], "val": [...]}} per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(range(1, len(c["train"]) + 1), c["train"], color=color, label=f"{label} train")
        if c.get("val"):
            ax.plot(range(1, len(c["val"]) + 1), c["val"], "--", color=color, label=f"{label} val")
    values = [v for c in curves.values() for v in list(c["train"]) + list(c.get("val") or []) if v > 0]
    if values and max(values) / min(values) > 20:  # e.g. MSE from 0.17 to 0.001: log shows both ends
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    """Train one cell on a text task; write the run folder; return metrics."""
    task = args.task
    if task not in TASKS:
        raise ValueError(f"classify.run handles {', '.join(TASKS)}, not {task!r}")
    seed = int(getattr(args, "seed", None) or 0)
    out = Path(getattr(args, "out", None) or f"runs/{task}-{_arg(args, 'cell')}")
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    max_len = int(getattr(args, "max_len", None) or 64)
    data: TextSplits = load_text_task(task, seed=seed, min_freq=int(_arg(args, "min_freq")),
                                      max_len=max_len,
                                      max_examples=getattr(args, "max_examples", None))
    config = ModelConfig(cell=_arg(args, "cell"), vocab_size=len(data.vocab),
                         embed_dim=int(_arg(args, "embed_dim")), hidden=int(_arg(args, "hidden")),
                         layers=int(_arg(args, "layers")), dropout=float(_arg(args, "dropout")),
                         bidirectional=bool(getattr(args, "bidirectional", False)),
                         head="classify", output_size=len(data.labels), padding_idx=0)
    model = SequenceModel(config)
    batch_size = int(_arg(args, "batch_size"))
    word_dropout = float(_arg(args, "word_dropout"))
    val_batches = batches(data.val, 256)
    val_acc: list[float] = []
    val_ce: list[float] = []

    def val_error(m) -> float:
        # Early stopping and the kept weights follow validation ACCURACY (the
        # metric we report); cross-entropy keeps falling/rising on its own
        # schedule once the model grows over-confident.
        preds = predict(m, data.val)
        val_acc.append(sum(p == y for p, (_, y, _) in zip(preds, data.val)) / len(data.val))
        val_ce.append(evaluate(m, val_batches, loss_fn))
        return 1.0 - val_acc[-1]

    train_cfg = dict(epochs=int(_arg(args, "epochs")), lr=float(_arg(args, "lr")),
                     batch_size=batch_size, clip=1.0, patience=int(_arg(args, "patience")),
                     budget_s=getattr(args, "budget_s", None), word_dropout=word_dropout,
                     weight_decay=float(_arg(args, "weight_decay")), seed=seed)
    history = fit(model, lambda e: batches(data.train, batch_size, seed * 1000 + e, word_dropout),
                  loss_fn, val_fn=val_error,
                  epochs=train_cfg["epochs"], lr=train_cfg["lr"], clip=1.0,
                  weight_decay=train_cfg["weight_decay"], patience=train_cfg["patience"],
                  budget_s=train_cfg["budget_s"], seed=seed,
                  device=getattr(args, "device", None), desc=f"{task} {config.cell}",
                  progress=bool(getattr(args, "progress", True)))
    model.cpu().eval()

    preds = predict(model, data.test)
    test_labels = [y for _, y, _ in data.test]
    majority, majority_acc = majority_accuracy([y for _, y, _ in data.train], test_labels)
    test_acc = sum(p == y for p, y in zip(preds, test_labels)) / len(test_labels)
    confusion = [[0] * len(data.labels) for _ in data.labels]
    for p, y in zip(preds, test_labels):
        confusion[y][p] += 1
    metrics = {
        "task": task, "cell": config.cell,
        "test_accuracy": test_acc,
        "majority_class": data.labels[majority],
        "majority_accuracy": majority_acc,
        "points_over_majority": 100 * (test_acc - majority_acc),
        "val_accuracy_per_epoch": val_acc,
        "val_loss_per_epoch": val_ce,
        "accuracy_by_length": accuracy_by_length(data.test, preds, majority),
        "confusion": {"rows_true_cols_pred": data.labels, "counts": confusion},
        "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test),
                  "vocab": len(data.vocab)},
        "parameters": count_parameters(model),
        "recurrent_parameters": count_parameters(model.rnn),
        "train_seconds": history.seconds,
        "history": history.to_dict(),
    }
    ckpt = Checkpoint(
        model=config.to_dict(),
        task={"name": task, "seed": seed, "min_freq": int(_arg(args, "min_freq")), "max_len": max_len,
              "max_examples": getattr(args, "max_examples", None), "splits": "stratified 80/10/10"},
        train=train_cfg, normalization=None,
        extra={"labels": list(data.labels), "vocab": data.vocab.to_list(),
               "tokenizer": data.tokenizer.to_dict()},
        metrics={k: v for k, v in metrics.items() if k != "history"})
    save_checkpoint(out / "checkpoint.pt", model, ckpt)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses({config.cell: {"train": history.train_loss, "val": val_ce}},
                out / "loss.png", f"{task}: loss per epoch ({config.cell})", "cross-entropy")
    plot_accuracy_by_length({config.cell: metrics["accuracy_by_length"]}, out / "accuracy_by_length.png",
                            f"{task}: test accuracy by sentence length")
    return metrics
