"""Run one contender's training step in a loop, for profilers (perf, py-spy, callgrind).

    python bench/profile_step.py ckpt medium 1 --steps 200 [--threads 2] [--gemm-only] [--split]

--split times the parts of a ckpt step separately (forward, loss gradient, backward, update,
zero_grad) with the same median-of-steps method; --gemm-only loops over ckpt's GEMM-only
sequence instead of the step.
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("contender", choices=sorted(CONTENDERS))
    p.add_argument("workload", choices=sorted(wl.WORKLOADS))
    p.add_argument("k", type=int)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gemm-only", action="store_true")
    p.add_argument("--split", action="store_true")
    a = p.parse_args()
    w = wl.WORKLOADS[a.workload]
    c = CONTENDERS[a.contender](a.threads)
    c.workload = w
    c.x, c.t = wl.batch_data(w)
    c.prepare(w, a.k, "uniform")
    fn = c.gemm_only if a.gemm_only else c.step
    for _ in range(5):
        fn()
    if a.split:
        split(c, a.steps)
        return
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = np.array(times) * 1e3
    print(f"{a.contender} {a.workload} k={a.k}{' gemm-only' if a.gemm_only else ''}: "
          f"median {np.median(t):.3f} ms, min {t.min():.3f}, max {t.max():.3f} (n={t.size})")


def split(c, steps: int) -> None:
    """Median time of each part of a ckpt or NumPy step."""
    parts = {"forward": [], "loss grad": [], "backward": [], "update": [], "zero_grad": []}
    model = c.model
    a_ckpt = c.name == "ckpt"   # its step sets the gradients in backward: no zero_grad
    for _ in range(steps):
        t0 = time.perf_counter()
        y = model.forward(c.x)
        t1 = time.perf_counter()
        np.subtract(y, c.t, out=c.g)
        c.g *= c.scale
        t2 = time.perf_counter()
        if a_ckpt:
            model.backward(c.g, input_grad=False, accumulate=False)
        else:
            model.backward(c.g)
        t3 = time.perf_counter()
        model.update(c.lr)
        t4 = time.perf_counter()
        if not a_ckpt and hasattr(model, "zero_grad"):
            model.zero_grad()
        t5 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[key].append(dt)
    total = 0.0
    for key, xs in parts.items():
        med = float(np.median(xs)) * 1e3
        total += med
        print(f"  {key:10s} median {med:.3f} ms  min {min(xs) * 1e3:.3f}")
    print(f"  sum of medians {total:.3f} ms")


if __name__ == "__main__":
    main()
