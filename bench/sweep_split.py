"""Sweep per-GEMM size: batch-split ("split") against BLAS threading ("blas") at T threads.

    python bench/sweep_split.py [--threads 2] [--seconds 0.3] [--rounds 3] [--json FILE]

Each point is a chain of L float32 Dense(w -> w, relu) layers at batch m, plain backprop, one
step = forward + backward (input gradient skipped, gradients set: accumulate=False) + update; L (2 to 32) keeps a
step near 0.2 GFLOP, so that small points are not all dispatch overhead. Both modes run in
the same process, alternating in rounds; the time of a mode is the median over its rounds of
the median step time in a round. The per-GEMM size is m * w * w multiply-adds (the full
batch's). The script prints, per point, the two times and split's speedup, then the largest
m*w*w / T at which split still won, and the smallest at which it lost (the "auto" mode
measures split against OpenBLAS threading per chain instead: ckpt.tuning). Timings on a shared machine are noisy: repeat the sweep.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import ckpt
from ckpt import SegmentCheckpointer
from ckpt.train import build_mlp

POINTS = [(m, w) for w in (64, 128, 256, 512, 1024) for m in (32, 128, 512)]


def depth(m: int, w: int) -> int:
    """Layers of a point: about 2e8 FLOPs a step (6 m w^2 per layer), 2 to 32."""
    return max(2, min(32, int(2e8 // (6 * m * w * w))))


def step_time(model, x, g, seconds):
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        model.forward(x)
        model.backward(g, input_grad=False, accumulate=False)
        model.update(1e-6)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=0.3, help="per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the points to this file")
    args = p.parse_args()
    ckpt.set_num_threads(args.threads)
    T = ckpt.get_num_threads()
    rows = []
    print(f"T = {T}; L x Dense(w, w) relu, float32, plain backprop")
    print(f"{'m':>5} {'w':>5} {'L':>3} {'m*w*w/T':>12} {'split ms':>9} {'blas ms':>9} "
          f"{'split speedup':>14}")
    for m, w in POINTS:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((m, w)).astype(np.float32)
        g = rng.standard_normal((m, w)).astype(np.float32)
        n_layers = depth(m, w)
        models = {mode: SegmentCheckpointer(build_mlp(w, n_layers, w, w, "relu", np.float32,
                                                      seed=0),
                                            1, threads_mode=mode) for mode in ("split", "blas")}
        for model in models.values():
            step_time(model, x, g, 0.05)   # warm-up: workspaces, pool, OpenBLAS buffers
        samples = {mode: [] for mode in models}
        for _ in range(args.rounds):
            for mode, model in models.items():
                samples[mode].append(step_time(model, x, g, args.seconds))
        split, blas = (statistics.median(samples[k]) for k in ("split", "blas"))
        size = m * w * w
        rows.append({"m": m, "w": w, "layers": n_layers, "mnk": size, "mnk_per_thread": size / T,
                     "split_s": split, "blas_s": blas, "split_speedup": blas / split})
        print(f"{m:>5} {w:>5} {n_layers:>3} {size / T:>12,.0f} {split * 1e3:>9.3f} "
              f"{blas * 1e3:>9.3f} {blas / split:>14.2f}")
    won = [r["mnk_per_thread"] for r in rows if r["split_speedup"] >= 1]
    lost = [r["mnk_per_thread"] for r in rows if r["split_speedup"] < 1]
    print(f"split won up to m*w*w/T = {max(won) if won else 0:,.0f}; "
          f"lost from {min(lost) if lost else float('inf'):,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": T, "points": rows}, f, indent=1)


if __name__ == "__main__":
    main()
