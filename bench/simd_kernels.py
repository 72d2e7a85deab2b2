"""Per-kernel speed of the SIMD variants of ckpt's elementwise kernels (src/ckpt/_simd.h).

    python bench/simd_kernels.py [--batch-seconds 0.002]

Compiles bench/simd_kernels.c with the flags of setup.py's release build (-O3 -fno-math-errno
-ffp-contract=off -fno-trapping-math, no -march), runs it, and prints a table: the best time of one call of each
kernel on 64 x 256 and 256 x 1024 arrays, float32 and float64, in every variant this CPU
supports, and the speed-up of each over the baseline. Each round times every variant in turn,
alternating their order; the best of 15 rounds is kept. Times on a shared machine are noisy;
compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "simd_kernels.c"
INCLUDE = HERE.parent / "src" / "ckpt"
FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fno-trapping-math", "-std=gnu11"]


def measure(batch_seconds: float) -> list[tuple[str, str, int, int, str, float]]:
    """(kernel, dtype, m, n, variant, seconds per call) for every kernel, size and variant."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("simd_kernels.py: needs a C compiler (cc or gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "simd_kernels"
        subprocess.run([compiler, *FLAGS, f"-I{INCLUDE}", str(SOURCE), "-o", str(exe), "-lm"],
                       check=True)
        out = subprocess.run([str(exe), str(batch_seconds)], check=True, capture_output=True,
                             text=True).stdout
    rows = []
    for line in out.splitlines():
        kernel, dtype, m, n, variant, sec = line.split("\t")
        rows.append((kernel, dtype, int(m), int(n), variant, float(sec)))
    return rows


def table(rows: list[tuple[str, str, int, int, str, float]]) -> str:
    variants = list(dict.fromkeys(r[4] for r in rows))
    times: dict[tuple, dict[str, float]] = {}
    for kernel, dtype, m, n, variant, sec in rows:
        times.setdefault((kernel, dtype, m, n), {})[variant] = sec
    head = ["kernel", "dtype", "m x n"] + [f"{v} µs" for v in variants] + \
        [f"baseline / {v}" for v in variants[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, dtype, m, n), t in times.items():
        cells = [kernel, dtype, f"{m} x {n}"] + [f"{t[v] * 1e6:.2f}" for v in variants] + \
            [f"{t['baseline'] / t[v]:.2f}" for v in variants[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-seconds", type=float, default=0.002,
                   help="time of one timed batch of calls in the baseline (default 0.002)")
    args = p.parse_args(argv)
    print(table(measure(args.batch_seconds)))


if __name__ == "__main__":
    sys.exit(main())
