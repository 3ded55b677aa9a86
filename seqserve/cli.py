"""`seqserve SUBCOMMAND ...`: one console script, one module per subcommand.

Subcommands are imported lazily so that `seqserve serve` runs where torch is
not installed (the serving image), and each layer keeps its own parser.
A subcommand's `main(argv)` returns an exit code; a ValueError or OSError
raised for bad input becomes a one-line message and exit code 2, never a
traceback.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help)
SUBCOMMANDS = {
    "train": ("training.cli", "main", "train a model on a task and write a run folder"),
    "export": ("training.export", "main", "export a run folder to the model repository (parity-gated)"),
    "compare": ("training.compare", "main", "train several cells under one budget and write a report"),
    "serve": ("serving.cli", "serve_main", "serve every model in the repository over gRPC"),
    "predict": ("serving.cli", "predict_main", "send whole sequences (or text) to a server"),
    "stream": ("serving.cli", "stream_main", "stream stdin values (or words) step by step to a server"),
    "bench": ("seqserve.bench", "main", "benchmarks: cells, serve, soak"),
}


def usage() -> str:
    lines = ["usage: seqserve SUBCOMMAND [options]", "", "subcommands:"]
    for name, (_, _, help_) in SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {help_}")
    lines.append("")
    lines.append("`seqserve SUBCOMMAND --help` for a subcommand's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from seqserve import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"seqserve: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    try:
        fn = getattr(importlib.import_module(module), func)
    except ImportError as exc:  # e.g. `train` in the torch-free serving image
        print(f"seqserve {name}: cannot run here: {exc} (install seqserve[train] for training)",
              file=sys.stderr)
        return 2
    try:
        return int(fn(rest) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        print(f"seqserve {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
