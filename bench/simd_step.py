"""Training-step time of the benchmark workloads in each SIMD variant of ckpt's elementwise
kernels, in one process: rounds of `--steps` steps per variant, the variants alternating in
order from round to round, so that they share the machine's state; the median step of each
variant over all rounds, and the ratio to the baseline. The step is bench/run.py's (ckpt's
contender in bench/worker.py: forward, loss gradient, backward, update).

    python bench/simd_step.py [--workloads small,medium] [--k 1] [--rounds 10] [--steps 50]
                              [--threads N]

Times on a shared machine are noisy; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import workloads as wl  # noqa: E402
from worker import CONTENDERS  # noqa: E402

from ckpt import _core  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="small,medium")
    p.add_argument("--k", type=int, default=1, help="checkpoint every k layers (default 1)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="steps per round and variant")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    variants = _core._supported_simd()
    before = _core.simd_variant()
    print(f"threads {args.threads}, k = {args.k}, {args.rounds} rounds of {args.steps} steps "
          f"per variant; median step in ms")
    print(f"| workload | {' | '.join(variants)} | "
          + " | ".join(f"baseline / {v}" for v in variants[1:]) + " |")
    print("|---|" + "---|" * (2 * len(variants) - 1))
    for name in args.workloads.split(","):
        w = wl.WORKLOADS[name]
        c = CONTENDERS["ckpt"](args.threads)
        c.workload = w
        c.x, c.t = wl.batch_data(w)
        c.prepare(w, args.k, "uniform")
        times = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                _core._set_simd(v)
                for _ in range(3):
                    c.step()
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    c.step()
                    times[v].append(time.perf_counter() - t0)
        med = {v: float(np.median(times[v])) * 1e3 for v in variants}
        print(f"| {name} {w.depth}×{w.width}, B={w.batch} | "
              + " | ".join(f"{med[v]:.3f}" for v in variants) + " | "
              + " | ".join(f"{med['baseline'] / med[v]:.2f}" for v in variants[1:]) + " |")
    _core._set_simd(before)


if __name__ == "__main__":
    main()
