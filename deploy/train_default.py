"""Trainer job: train and export the default model unless the repository has it.

The compose `trainer` service runs this once before the server starts. It is
idempotent: when REPO/NAME already holds a version it exits 0 at once, so a
restarted stack (or a second `docker compose up`) never retrains. Training
and export run in this one process so torch is imported once.

    python deploy/train_default.py --repo /models --runs /runs --name sine-lstm \
        --task sine --cell lstm --train-args "--epochs 20"
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from seqserve import artifact, cli


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_default.py", description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=artifact.DEFAULT_REPO, help="model repository root")
    p.add_argument("--runs", default="runs", help="folder for run folders (checkpoints, plots)")
    p.add_argument("--name", default="sine-lstm", help="model name to publish")
    p.add_argument("--task", default="sine", help="`seqserve train --task`")
    p.add_argument("--cell", default="lstm", help="`seqserve train --cell`")
    p.add_argument("--train-args", default="",
                   help='more `seqserve train` flags as one shell-quoted string, e.g. "--epochs 3"')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    artifact.check_model_name(args.name)
    have = artifact.versions(args.repo, args.name)
    if have:
        print(f"trainer: {args.repo}/{args.name} already has version(s) {have}: nothing to do", flush=True)
        return 0
    Path(args.repo).mkdir(parents=True, exist_ok=True)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    run_dir = str(Path(args.runs) / args.name)
    train = ["train", "--task", args.task, "--cell", args.cell, "--out", run_dir,
             *shlex.split(args.train_args)]
    print(f"trainer: seqserve {shlex.join(train)}", flush=True)
    rc = cli.main(train)
    if rc != 0:
        return rc
    export = ["export", run_dir, "--repo", args.repo, "--name", args.name]
    print(f"trainer: seqserve {shlex.join(export)}", flush=True)
    rc = cli.main(export)
    if rc == 0:
        print(f"trainer: published {args.name} version(s) {artifact.versions(args.repo, args.name)}", flush=True)
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:  # a bad name or flag: one line, no traceback
        print(f"trainer: error: {exc}", file=sys.stderr)
        sys.exit(2)
