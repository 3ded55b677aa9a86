"""`seqserve bench WHAT ...`: benchmark front door.

  cells  numba_cells.bench      one streaming step per engine (Numba, ONNX Runtime, PyTorch)
  serve  serving.bench          the gRPC server under load
  soak   serving.soak           a long run watching memory and latency

Each target module is imported only when asked for, so a missing optional
part (or torch in the serving image) never breaks the others.
"""
from __future__ import annotations

import importlib
import sys

TARGETS = {
    "cells": ("numba_cells.bench", "one streaming step per engine: Numba CPU/CUDA, ONNX Runtime, PyTorch"),
    "serve": ("serving.bench", "the gRPC server under load"),
    "soak": ("serving.soak", "a long run watching memory and latency"),
}


def usage() -> str:
    lines = ["usage: seqserve bench {" + ",".join(TARGETS) + "} [options]", ""]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in TARGETS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in TARGETS:
        print(f"seqserve bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = TARGETS[name][0]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        print(f"seqserve bench {name}: not available here ({exc})", file=sys.stderr)
        return 2
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
