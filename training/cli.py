"""`seqserve train`: one parser for every task, each task's runner imported lazily.

A runner is `run(args: argparse.Namespace) -> dict` (its metrics); it writes
the run folder args.out itself. Before it is called, every flag the user left
out is filled from, in order: the runner module's `DEFAULTS[task]` (a dict, if
the module defines one), then COMMON_DEFAULTS below. So a runner always sees
concrete values, and per-task defaults live beside the code they tune.
DEFAULTS may be keyed by task ({"lm": {...}}) or flat ({"hidden": 128, ...}).

Bad input raises ValueError with a one-line message; seqserve.cli prints it
and exits 2 (no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

from training.model import CELLS

# task -> "module:function"
RUNNERS = {
    "sine": "training.train:run",
    "sunspots": "training.train:run",
    "co2": "training.train:run",
    "csv": "training.train:run",
    "sentiment2": "training.classify:run",
    "sentiment3": "training.classify:run",
    "adding": "training.adding:run",
    "ner": "training.ner:run",
    "lm": "training.lm:run",
}

COMMON_DEFAULTS = dict(
    cell="lstm", layers=1, hidden=64, embed_dim=64, epochs=5, seed=0, lr=1e-3, batch_size=32,
    dropout=0.0, bidirectional=False, budget_s=None, device="auto", weight_decay=0.0, clip=1.0,
    patience=3, window=None, csv=None, columns=None, noise=0.0, max_examples=None, min_freq=2,
    threads=1,
)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ValueError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise ValueError(f"{message} (see `seqserve train --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="seqserve train", description="Train a recurrent model on a task and write a run "
                "folder (checkpoint.pt, metrics.json, plots). Flags left out take the task's defaults.")
    p.add_argument("--task", required=True, metavar="TASK", help=f"one of: {', '.join(RUNNERS)}")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder to write (its parent must exist)")
    m = p.add_argument_group("model")
    m.add_argument("--cell", metavar="CELL", help=f"recurrent cell: {', '.join(CELLS)}")
    m.add_argument("--layers", type=int, help="stacked recurrent layers")
    m.add_argument("--hidden", type=int, help="hidden units per layer")
    m.add_argument("--embed-dim", type=int, help="token embedding width (text tasks)")
    m.add_argument("--dropout", type=float, help="dropout between layers, in [0, 1)")
    m.add_argument("--bidirectional", action="store_true", default=None,
                   help="read both ways (whole-sequence text tasks only; such models cannot stream)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    t.add_argument("--seed", type=int, help="random seed (data generation, init, shuffling)")
    t.add_argument("--lr", type=float, help="AdamW learning rate")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    t.add_argument("--batch-size", type=int, help="windows or sequences per step")
    t.add_argument("--clip", type=float, help="max gradient norm (0: no clipping)")
    t.add_argument("--patience", type=int, help="epochs without a better validation loss before stopping")
    t.add_argument("--budget-s", type=float, help="wall-clock limit for training, seconds")
    t.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    t.add_argument("--threads", type=int, help="CPU threads for torch (default 1: small recurrent models "
                   "gain little from more, and on a shared machine extra threads spin and slow everyone)")
    f = p.add_argument_group("forecasting (sine, sunspots, co2, csv)")
    f.add_argument("--window", type=int, help="training window length in steps")
    f.add_argument("--csv", metavar="FILE", help="csv task: file with a header row")
    f.add_argument("--columns", metavar="A,B,...", help="csv task: columns to forecast (all together)")
    f.add_argument("--noise", type=float, help="sine task: std of added Gaussian noise")
    a = p.add_argument_group("adding problem")
    a.add_argument("--lag", type=int, help="sequence length of the adding problem")
    x = p.add_argument_group("text (sentiment2, sentiment3, ner, lm)")
    x.add_argument("--max-examples", type=int, help="use only this many training examples (quick runs, tests)")
    x.add_argument("--min-freq", type=int, help="vocabulary: keep tokens seen at least this often in train")
    return p


def _positive(args, name: str, *, allow_zero: bool = False) -> None:
    v = getattr(args, name)
    if v is not None and (v < 0 or (v == 0 and not allow_zero)):
        what = "must be >= 0" if allow_zero else "must be positive"
        raise ValueError(f"--{name.replace('_', '-')} {what}, got {v}")


def validate(args: argparse.Namespace) -> None:
    """Checks every runner relies on; a runner adds its own."""
    if args.task not in RUNNERS:
        raise ValueError(f"unknown task {args.task!r}: choose one of {', '.join(RUNNERS)}")
    if args.cell is not None and args.cell not in CELLS:
        raise ValueError(f"unknown cell {args.cell!r}: choose one of {', '.join(CELLS)}")
    for name in ("layers", "hidden", "embed_dim", "epochs", "batch_size", "window", "max_examples",
                 "min_freq", "lr", "budget_s", "patience", "threads", "lag"):
        _positive(args, name)
    for name in ("weight_decay", "clip", "noise"):
        _positive(args, name, allow_zero=True)
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.columns is not None:
        args.columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    out = Path(args.out)  # created (with its parents, e.g. runs/ in a fresh clone) by the task
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {args.out}: {folder} exists and is not a folder")
            break


def load_runner(task: str):
    """Import the task's module; a task whose module is not written yet is a clear error."""
    module_name, func = RUNNERS[task].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValueError(f"task {task!r} is not available: module {module_name} is missing") from None
        raise
    return module, getattr(module, func)


def task_defaults(module, task: str) -> dict:
    """The runner module's defaults for `task`: DEFAULTS[task], or DEFAULTS itself when flat."""
    d = getattr(module, "DEFAULTS", None) or {}
    if isinstance(d.get(task), dict):
        return d[task]
    return {k: v for k, v in d.items() if not isinstance(v, dict)}


def fill_defaults(args: argparse.Namespace, module) -> None:
    for key, value in {**COMMON_DEFAULTS, **task_defaults(module, args.task)}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    validate(args)
    module, run = load_runner(args.task)
    fill_defaults(args, module)
    torch.set_num_threads(args.threads)
    metrics = run(args)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    print(json.dumps(scalars, indent=1))
    print(f"wrote {args.out}: {', '.join(sorted(p.name for p in Path(args.out).iterdir()))}")
    return 0
