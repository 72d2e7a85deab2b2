"""Test accuracy of the pre-norm residual MLP on the bundled digits, by depth (issue 9's target:
>= 97% at 64 and 128 blocks, where a plain Dense stack of 64 layers stays at chance).

    python bench/resmlp_accuracy.py [--depths 16,64,128] [--epochs 30] [--width 256]
                                    [--batch-size 64] [--threads 1] [--seed 0] [--out FILE.md]

For each depth D it runs ``ckpt train --residual --depth D --width 256 --batch-size 64
--epochs 30 --json`` (Adam, default checkpointing, the CLI's stratified 80/20 split) in a
subprocess and prints a markdown table of test accuracy and training time. When the installed
``ckpt train`` has no ``--residual`` yet, it does the same in-process: the CLI's data preparation
and defaults, ``ckpt.build_mlp(..., residual=True)`` and ``ckpt.fit`` (the table says which).
Times are wall-clock on whatever else the machine is doing: compare them within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List


def _positive_ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths must be positive integers, got {text!r}")
    return values


def cli_has_residual() -> bool:
    """Whether ``ckpt train`` takes --residual."""
    proc = subprocess.run([sys.executable, "-m", "ckpt", "train", "--help"],
                          capture_output=True, text=True)
    return proc.returncode == 0 and "--residual" in proc.stdout


def run_cli(depth: int, args: argparse.Namespace) -> Dict:
    cmd = [sys.executable, "-m", "ckpt", "train", "--residual", "--depth", str(depth),
           "--width", str(args.width), "--batch-size", str(args.batch_size),
           "--epochs", str(args.epochs), "--threads", str(args.threads),
           "--seed", str(args.seed), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = [line for line in proc.stdout.splitlines() if line.startswith("model:")]
    result["model_line"] = summary[0] if summary else ""
    return result


def run_api(depth: int, args: argparse.Namespace) -> Dict:
    """What ``ckpt train --residual`` does, through the library (digits only)."""
    import numpy as np

    import ckpt
    from ckpt.checkpoint import SegmentCheckpointer
    from ckpt.cli import DEFAULT_LR, TEST_FRACTION
    from ckpt.datasets import digits_scaler, digits_table, prepare_training_data
    from ckpt.optim import OPTIMIZERS
    from ckpt.train import build_mlp, evaluate, fit

    previous = ckpt.get_num_threads()
    ckpt.set_num_threads(args.threads)
    try:
        rng = np.random.default_rng(args.seed)
        data = prepare_training_data(digits_table(np.float32), rng, test_fraction=TEST_FRACTION,
                                     scaler=digits_scaler())
        X_train, y_train, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
        classes = data.classes
        layers = build_mlp(X_train.shape[1], depth, args.width, len(classes), "relu", np.float32, rng,
                           residual=True)
        model = SegmentCheckpointer(layers)
        optimizer = OPTIMIZERS["adam"](model, DEFAULT_LR["adam"])
        start = time.perf_counter()
        history = fit(model, X_train, y_train, optimizer=optimizer, epochs=args.epochs,
                      batch_size=args.batch_size, seed=rng)
        seconds = time.perf_counter() - start
        test = evaluate(model, X_test, y_test)
    finally:
        ckpt.set_num_threads(previous)
    return {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "train_accuracy": history["accuracy"][-1], "seconds": seconds,
            "steps": args.epochs * math.ceil(len(X_train) / args.batch_size),
            "checkpoint_every": model.checkpoint_every,
            "parameter_count": model.parameter_count, "model_line": ""}


def table(rows: List[Dict], args: argparse.Namespace, via: str) -> str:
    lines = [f"`ckpt train --residual --width {args.width} --batch-size {args.batch_size} "
             f"--epochs {args.epochs} --threads {args.threads} --seed {args.seed}` "
             f"on the bundled digits ({via}); time is wall-clock, noisy on a shared machine.",
             "",
             "| blocks D | chain elements | parameters | checkpoint every | test accuracy | "
             "train accuracy | training time s | steps/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['depth'] + 3} | {r['parameter_count']:,} | "
                     f"{r['checkpoint_every']} | {r['test_accuracy']:.2%} | "
                     f"{r['train_accuracy']:.2%} | {r['seconds']:.1f} | "
                     f"{r['steps'] / r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=_positive_ints, default=[16, 64, 128],
                   help="comma-separated block counts (default 16,64,128)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="OpenBLAS threads (default 1, as ckpt train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    p.add_argument("--api", action="store_true",
                   help="train in-process through the library even if the CLI has --residual")
    args = p.parse_args(argv)
    for name in ("epochs", "width", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    use_cli = not args.api and cli_has_residual()
    via = ("`ckpt train --residual --json`, one process per depth" if use_cli else
           "in-process: the CLI's data preparation, build_mlp(residual=True) and fit")
    rows = []
    for depth in args.depths:
        print(f"[resmlp_accuracy] depth {depth} ...", file=sys.stderr, flush=True)
        result = run_cli(depth, args) if use_cli else run_api(depth, args)
        result["depth"] = depth
        rows.append(result)
        print(f"[resmlp_accuracy] depth {depth}: test accuracy {result['test_accuracy']:.2%} "
              f"in {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    text = table(rows, args, via)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    main()
