"""`seqserve compare`: train several cells under one budget and write a report.

    seqserve compare --task sentiment3 --cells rnn,lstm,gru --budget-s 180 --out reports/sentiment3
    seqserve compare --task adding --cells rnn,lstm,gru --lags 10,50,100,200 --budget-s 120

Report folder:
  report.md               table: cell, parameters, training time, per-step latency
                          of the served cell, test metric; the GRU-vs-LSTM table
  loss.png                validation loss per epoch, all cells
  accuracy_by_length.png  classification: test accuracy per length bucket, per cell
  lag.png                 adding: test MSE against lag, per cell
  gradients.png           adding: ||dLoss/dh_t|| against distance from the loss
  runs/…                  every run folder (checkpoint.pt, metrics.json, plots)
  model_repository/…      the exported ONNX models whose step latency is measured
  compare.json            everything above as numbers
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training import adding, classify
from training.model import CELLS
from training.textdata import TASKS as TEXT_TASKS

TASKS = (*TEXT_TASKS, "adding")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="seqserve compare", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=TASKS, help="what to train every cell on")
    p.add_argument("--cells", default="rnn,lstm,gru", help="comma-separated cells (default rnn,lstm,gru)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock training budget per cell (adding: per cell and lag)")
    p.add_argument("--budget-kind", choices=("wall", "cpu"), default="wall",
                   help="adding: count wall-clock seconds or this process's CPU seconds (fair on a busy machine)")
    p.add_argument("--wall-cap-s", type=float, default=None,
                   help="adding with --budget-kind cpu: also stop a run after this many wall seconds")
    p.add_argument("--out", default=None, help="report folder (default reports/TASK)")
    p.add_argument("--max-examples", type=int, default=None, help="text tasks: train on a subset")
    p.add_argument("--lags", default=",".join(map(str, adding.LAGS)), help="adding: lags to sweep")
    p.add_argument("--epochs", type=int, default=None, help="upper bound on epochs per run")
    p.add_argument("--hidden", type=int, default=None, help="hidden units, the same for every cell")
    p.add_argument("--layers", type=int, default=None, help="recurrent layers")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="adding: batches per epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-export", action="store_true",
                   help="skip the ONNX export and the served-cell latency column")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished run folders under OUT/runs instead of training them again")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite report.md from OUT/compare.json without training")
    args = p.parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS]
    if not cells or bad:
        p.error(f"--cells: unknown cell(s) {', '.join(bad) or '(none)'}; choose from {', '.join(CELLS)}")
    if len(set(cells)) != len(cells):
        p.error("--cells: a cell is named twice")
    args.cells = cells
    try:
        args.lags = sorted({int(v) for v in args.lags.split(",") if v.strip()})
    except ValueError:
        p.error(f"--lags: expected comma-separated integers, got {args.lags!r}")
    if not args.lags or min(args.lags) < 2:
        p.error("--lags: every lag must be >= 2")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s must be positive")
    if args.max_examples is not None and args.max_examples < 10:
        p.error("--max-examples must be >= 10")
    args.out = Path(args.out or f"reports/{args.task}")
    return args


# ---------------------------------------------------------------- latency

def step_latency(onnx_path: Path, repeats: int = 300) -> tuple[float, str]:
    """Median microseconds of one step at batch 1 of the served model, and how.

    Prefers the Numba streaming cell (what `stream` sessions run: one session
    slot, state kept inside the cell); falls back to ONNX Runtime with T=1 and
    the state fed back when the cell cannot load the model.
    """
    try:
        from numba_cells import CellError, load_cell
        cell = load_cell(str(onnx_path), device="cpu", capacity=1)
    except (ImportError, ValueError) as exc:  # CellError is a ValueError
        print(f"compare: numba cell unavailable for {onnx_path} ({exc}); timing ONNX Runtime T=1",
              file=sys.stderr)
        return _ort_latency(onnx_path, repeats), "ONNX Runtime run(), T=1"
    x = _step_input(onnx_path)
    x = x[:, 0]  # one step: (1,) token ids or (1, F) floats
    slots = np.zeros(1, dtype=np.int64)
    for _ in range(20):  # warm caches (load_cell already compiled the kernels)
        cell.step(x, slots)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cell.step(x, slots)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times), "numba cell step (CPU)"


def _step_input(onnx_path: Path):
    from seqserve.artifact import load_model_info
    info = load_model_info(onnx_path)
    if info.input_kind == "tokens":
        return np.array([[2]], dtype=np.int64)  # (B=1, T=1)
    return np.full((1, 1, info.input_features), 0.5, dtype=np.float32)  # (1, 1, F)


def _ort_latency(onnx_path: Path, repeats: int) -> float:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name == "x":
            feeds["x"] = _step_input(onnx_path)
        else:  # h0 / c0: (L*D, 1, H)
            feeds[inp.name] = np.zeros([d if isinstance(d, int) else 1 for d in inp.shape], np.float32)
    outs = [o.name for o in sess.get_outputs()]
    state_out = {"h0": "hn", "c0": "cn"}
    times = []
    for i in range(repeats + 20):
        t0 = time.perf_counter()
        result = dict(zip(outs, sess.run(outs, feeds)))
        if i >= 20:
            times.append(time.perf_counter() - t0)
        for name, out in state_out.items():
            if name in feeds:
                feeds[name] = result[out]
    return 1e6 * statistics.median(times)


def export_and_time(run_dir: Path, repo: Path, name: str) -> dict:
    """Export through the parity gate and time one served step.

    A run whose export fails the gate is not lost: the report says so, and the
    step is timed on the same graph written outside the repository.
    """
    from training.export import ParityError, build_onnx, export_run
    from training.model import load_checkpoint
    try:
        path = export_run(run_dir, repo=repo, name=name, force=True, log=lambda *_: None)
        gate = "passed"
    except ParityError as exc:
        print(f"compare: export of {run_dir} failed the parity gate: {exc}", file=sys.stderr)
        model, ckpt = load_checkpoint(run_dir / "checkpoint.pt")
        path = run_dir / "ungated.onnx"
        path.write_bytes(build_onnx(model, ckpt, source_run=str(run_dir)).SerializeToString())
        gate = f"FAILED: {exc}"
    us, how = step_latency(path)
    return {"onnx": str(path), "step_us": us, "latency_via": how, "parity_gate": gate}


def _finished(run_dir: Path) -> dict | None:
    """metrics of a finished run folder (--resume), else None."""
    if (run_dir / "checkpoint.pt").is_file() and (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text())
    return None


# ---------------------------------------------------------------- tasks

def _namespace(args, **kw):
    base = dict(task=args.task, seed=args.seed, device=args.device, budget_s=args.budget_s,
                epochs=args.epochs, hidden=args.hidden, layers=args.layers,
                max_examples=args.max_examples, progress=not args.no_progress)
    base.update(kw)
    return argparse.Namespace(**base)


def compare_text(args) -> dict:
    results = {}
    for cell in args.cells:
        run_dir = args.out / "runs" / f"{args.task}-{cell}"
        t0 = time.perf_counter()
        m = _finished(run_dir) if args.resume else None
        if m is None:
            m = classify.run(_namespace(args, cell=cell, out=str(run_dir)))
            m["wall_seconds"] = time.perf_counter() - t0
        else:
            print(f"compare: --resume: reusing {run_dir}", file=sys.stderr)
        if not args.no_export:
            m["served"] = export_and_time(run_dir, args.out / "model_repository", f"{args.task}-{cell}")
        results[cell] = m
    classify.plot_accuracy_by_length({c: m["accuracy_by_length"] for c, m in results.items()},
                                     args.out / "accuracy_by_length.png",
                                     f"{args.task}: test accuracy by sentence length")
    classify.plot_losses({c: {"train": m["history"]["train_loss"], "val": m["val_loss_per_epoch"]}
                          for c, m in results.items()},
                         args.out / "loss.png", f"{args.task}: cross-entropy per epoch", "cross-entropy")
    return results


def compare_adding(args) -> dict:
    grad_lag = 100 if 100 in args.lags else args.lags[-1]
    x, target = adding.gradient_batch(grad_lag, seed=args.seed)
    hidden = args.hidden or adding.DEFAULTS["hidden"]
    layers = args.layers or adding.DEFAULTS["layers"]
    results = {}
    for cell in args.cells:
        per_lag, init_norms, trained_norms = {}, None, None
        for lag in args.lags:
            run_dir = args.out / "runs" / f"adding-{lag}-{cell}"
            init = None
            if lag == grad_lag:  # the same initial weights train_adding starts from
                init = adding.init_model(cell, hidden, layers, args.seed)
                init_norms = adding.gradient_norms(init, x, target)
            m = _finished(run_dir) if args.resume else None
            if m is not None:
                from training.model import load_checkpoint
                print(f"compare: --resume: reusing {run_dir}", file=sys.stderr)
                model, _ = load_checkpoint(run_dir / "checkpoint.pt")
            else:
                model, m, cfg = adding.train_adding(
                    cell, lag, hidden=hidden, layers=layers, budget_s=args.budget_s,
                    epochs=args.epochs or adding.DEFAULTS["epochs"],
                    steps_per_epoch=args.steps_per_epoch or adding.DEFAULTS["steps_per_epoch"],
                    seed=args.seed, device=args.device, progress=not args.no_progress,
                    budget_kind=args.budget_kind, wall_cap_s=args.wall_cap_s)
                adding.save_run(run_dir, model, m, cfg)
            if lag == grad_lag:
                trained_norms = adding.gradient_norms(model, x, target)
            if lag == grad_lag and not args.no_export:
                m["served"] = export_and_time(run_dir, args.out / "model_repository", f"adding-{lag}-{cell}")
            per_lag[lag] = m
        results[cell] = {"per_lag": per_lag, "grad_lag": grad_lag,
                         "gradient_norms": {"at_init": init_norms, "trained": trained_norms},
                         "parameters": per_lag[grad_lag]["parameters"]}
    _plot_lag(results, args.lags, args.out / "lag.png")
    curves = {}
    for cell, r in results.items():
        curves[f"{cell} at init"] = r["gradient_norms"]["at_init"]
        curves[f"{cell} trained"] = r["gradient_norms"]["trained"]
    adding.plot_gradients(curves, args.out / "gradients.png",
                          f"gradient flow on one batch, lag {grad_lag} (hidden {hidden})")
    classify.plot_losses({c: {"train": r["per_lag"][grad_lag]["history"]["train_loss"],
                              "val": r["per_lag"][grad_lag]["history"]["val_loss"]}
                          for c, r in results.items()},
                         args.out / "loss.png", f"adding problem, lag {grad_lag}: MSE per epoch", "MSE")
    return results


def _plot_lag(results: dict, lags: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cell, r in results.items():
        ax.plot(lags, [r["per_lag"][lag]["test_mse"] for lag in lags], marker="o", label=cell)
    ax.axhline(adding.TRIVIAL_MSE, color="k", ls="--", label="trivial (always 1.0)")
    ax.axhline(0.01, color="grey", ls=":", label="target 0.01")
    ax.set_yscale("log")
    ax.set_xlabel("lag (sequence length)")
    ax.set_ylabel("test MSE")
    ax.set_title("adding problem: test MSE against lag, same hidden size and budget")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- report

def _fmt_us(m: dict) -> str:
    s = m.get("served")
    if not s:
        return "n/a"
    flag = "" if s.get("parity_gate", "passed") == "passed" else " (export gate failed, see below)"
    return f"{s['step_us']:.1f}{flag}"


def _gates_table(rows: dict[str, dict]) -> list[str]:
    """The source texts' GRU-vs-LSTM comparison with our numbers in it."""
    theory = {
        "rnn": ("none", "h", "1 x (H(I+H) + 2H)", "1 tanh"),
        "lstm": ("3: input, forget, output (+ candidate)", "h and c", "4 x (H(I+H) + 2H)", "4 blocks"),
        "gru": ("2: update, reset (+ candidate)", "h", "3 x (H(I+H) + 2H)", "3 blocks"),
    }
    out = ["| cell | gates | states | recurrent parameters per layer (torch: 2 biases) "
           "| measured recurrent parameters | measured whole-model parameters "
           "| measured step latency (us) | measured training time (s) | measured test metric |",
           "|---|---|---|---|---|---|---|---|---|"]
    for cell, r in rows.items():
        gates, states, formula, _ = theory[cell]
        out.append(f"| {cell} | {gates} | {states} | {formula} | {r['recurrent']:,} | {r['parameters']:,} "
                   f"| {r['latency']} "
                   f"| {r['seconds']:.0f} | {r['metric']} |")
    return out


def write_report(args, results: dict, wall: float) -> None:
    lines = [f"# seqserve compare: {args.task}", ""]
    cmd = "seqserve compare " + " ".join(args.argv)
    lines += [f"Command: `{cmd.strip()}`  ", f"Wall time: {wall:.0f} s on {_machine()}  ",
              f"Budget per run: {args.budget_s or 'none (epochs bound)'} s "
              f"({args.budget_kind if args.task == 'adding' else 'wall'} time); seed {args.seed}.", ""]
    via = {m.get("served", {}).get("latency_via") for m in _served_runs(args, results)} - {None}
    summary = {}
    if args.task in TEXT_TASKS:
        any_m = next(iter(results.values()))
        lines += [f"Test set: {any_m['sizes']['test']} sentences; train {any_m['sizes']['train']}, "
                  f"vocabulary {any_m['sizes']['vocab']} (train split only). Majority class "
                  f"'{any_m['majority_class']}' scores {100 * any_m['majority_accuracy']:.1f}% on test.", ""]
        lines += ["| cell | parameters | training time (s) | epochs | step latency (us) | test accuracy "
                  "| over majority (points) |", "|---|---|---|---|---|---|---|"]
        for cell, m in results.items():
            lines.append(f"| {cell} | {m['parameters']:,} | {m['train_seconds']:.0f} | "
                         f"{m['history']['epochs']} ({m['history']['stopped']}) | {_fmt_us(m)} | "
                         f"{100 * m['test_accuracy']:.1f}% | {m['points_over_majority']:+.1f} |")
            summary[cell] = dict(parameters=m["parameters"], recurrent=_recurrent(m, args, cell),
                                 latency=_fmt_us(m), seconds=m["train_seconds"],
                                 metric=f"accuracy {100 * m['test_accuracy']:.1f}%")
        lines += ["", "Accuracy per sentence length (tokens), test set:", ""]
        names = classify.bucket_names()
        lines.append("| cell | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for cell, m in results.items():
            b = m["accuracy_by_length"]
            lines.append(f"| {cell} | " + " | ".join(
                "-" if b[n]["accuracy"] is None else f"{100 * b[n]['accuracy']:.1f}%" for n in names) + " |")
        b = any_m["accuracy_by_length"]
        lines.append("| majority | " + " | ".join(
            "-" if b[n]["majority_accuracy"] is None else f"{100 * b[n]['majority_accuracy']:.1f}%"
            for n in names) + " |")
        lines.append("| n | " + " | ".join(str(b[n]["n"]) for n in names) + " |")
        lines += ["", "![accuracy by length](accuracy_by_length.png)", "", "![loss](loss.png)"]
    else:
        lags = args.lags
        lines += [f"Trivial predictor (always 1.0): MSE {adding.TRIVIAL_MSE:.3f}. Solved means test MSE <= 0.01.",
                  ""]
        lines += ["| cell | parameters | training time, all lags (s) | step latency (us) | "
                  + " | ".join(f"test MSE lag {lag}" for lag in lags) + " |",
                  "|---|---|---|---|" + "---|" * len(lags)]
        for cell, r in results.items():
            secs = sum(m["train_seconds"] for m in r["per_lag"].values())
            served = r["per_lag"][r["grad_lag"]]
            lines.append(f"| {cell} | {r['parameters']:,} | {secs:.0f} | {_fmt_us(served)} | "
                         + " | ".join(f"{r['per_lag'][lag]['test_mse']:.4f}" for lag in lags) + " |")
            summary[cell] = dict(parameters=r["parameters"], recurrent=_recurrent(served, args, cell),
                                 latency=_fmt_us(served), seconds=secs,
                                 metric=f"MSE {served['test_mse']:.4f} at lag {r['grad_lag']}")
        lines += ["", "Gradient flow on one batch at lag "
                  f"{next(iter(results.values()))['grad_lag']}: decades lost between the last step and the first "
                  "(log10 ||dL/dh_last|| / ||dL/dh_first||):", "",
                  "| cell | at initialisation | after training |", "|---|---|---|"]
        for cell, r in results.items():
            g = r["gradient_norms"]
            lines.append(f"| {cell} | {-adding.log_ratio(g['at_init']):.1f} | {-adding.log_ratio(g['trained']):.1f} |")
        lines += ["", "![lag](lag.png)", "", "![gradients](gradients.png)", "", "![loss](loss.png)"]
    lines += ["", "## GRU vs LSTM (and the vanilla RNN), with our measurements", "",
              "H hidden units, I inputs per step. Cost: the step does 1 (RNN), 3 (GRU) or 4 (LSTM) "
              "blocks of H x (I+H) multiply-adds.", ""]
    lines += _gates_table(summary)
    lines += ["", f"Step latency: {', '.join(sorted(via)) or 'not measured (--no-export)'}, batch 1, "
              "median, one thread; noisy on a shared machine, compare within this table only."]
    for m in _served_runs(args, results):
        gate = m.get("served", {}).get("parity_gate", "passed")
        if gate != "passed":
            lines.append(f"\nExport of the {m['cell']} run: parity gate {gate}; its latency was timed on "
                         "the same graph written beside the run (ungated.onnx), not published.")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")


def _recurrent(m: dict, args, cell: str) -> int:
    """Parameters of the recurrent core alone (older metrics lack the field)."""
    if "recurrent_parameters" in m:
        return m["recurrent_parameters"]
    from training.model import load_checkpoint
    name = f"{args.task}-{cell}" if args.task in TEXT_TASKS else f"adding-{m['lag']}-{cell}"
    model, _ = load_checkpoint(args.out / "runs" / name / "checkpoint.pt")
    return sum(p.numel() for p in model.rnn.parameters())


def _served_runs(args, results):
    if args.task in TEXT_TASKS:
        return list(results.values())
    return [r["per_lag"][r["grad_lag"]] for r in results.values()]


def _machine() -> str:
    import os
    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def _jsonable(results):
    return json.loads(json.dumps(results, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.report_only:
        saved = json.loads((args.out / "compare.json").read_text())
        results = {cell: saved[cell] for cell in args.cells}
        if args.task == "adding":  # JSON turned the lag keys into strings
            for r in results.values():
                r["per_lag"] = {int(k): v for k, v in r["per_lag"].items()}
        wall = float(saved.get("_wall_seconds", 0.0))
    else:
        results = compare_adding(args) if args.task == "adding" else compare_text(args)
        wall = time.perf_counter() - t0
    write_report(args, results, wall)
    if not args.report_only:
        (args.out / "compare.json").write_text(json.dumps(_jsonable({**results, "_wall_seconds": wall}),
                                                          indent=1))
    print(f"wrote {args.out / 'report.md'} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
