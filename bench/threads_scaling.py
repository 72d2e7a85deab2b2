"""Measure what docs/threads_scaling.rst's model of a step's scaling with T is built from.

    python bench/threads_scaling.py [--threads T] [--rounds 7] [--json FILE]

For one float32 Dense(w -> w) layer (identity activation, plain backprop, accumulate=False: the
three GEMMs of a layer and its bias sums, nothing recomputed) at batch m, it times one step --
forward + backward -- in three configurations, alternating in rounds, in this one process:

- ``blas/1``: OpenBLAS at one thread; its rate 6 m w^2 / time is R1(m, w);
- ``blas/T``: OpenBLAS at T threads, rate RT(m, w);
- ``split/T``: the batch split into T slices on ckpt's pool.

It then prints, per width, the reduction cost per gradient value and per extra slice, c_red =
(split/T at batch T - blas/1 at batch 1) / ((T - 1) / T * parameters): a split step of one row
per slice does one row of GEMM work per thread, so what it adds is the reduction of the T - 1
copies and the pool's hand-offs. Medians over rounds; on a shared machine, repeat the run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import ckpt
from ckpt import Dense, SegmentCheckpointer
from ckpt.tuning import Config, timed

WIDTHS = (64, 256, 1024)
BATCHES = (1, 4, 16, 64, 256)


def step_seconds(w: int, m: int, config: Config, T: int, repeats: int) -> float:
    """Median seconds of one step of the one-layer chain in a configuration."""
    mode = "split" if config.slices > 1 else "blas"
    model = SegmentCheckpointer([Dense(w, w, dtype=np.float32, rng=0)], 1, threads_mode=mode)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, w)).astype(np.float32)
    g = rng.standard_normal((m, w)).astype(np.float32)

    def one():
        model.forward(x)
        model.backward(g, input_grad=True, accumulate=False)

    one()   # warm-up: workspaces, OpenBLAS and pool threads
    times = [timed(config, one)[1] for _ in range(repeats)]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=ckpt.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    T = args.threads
    configs = [Config(1), Config(T), Config(T, T)]
    rows = []
    print(f"T = {T}; seconds are medians over {args.rounds} rounds")
    print(f"{'w':>5} {'m':>5} {'R1 GF/s':>9} {'RT GF/s':>9} {'split GF/s':>10} "
          f"{'blas/T vs 1':>11} {'split vs blas/T':>15}")
    for w in WIDTHS:
        for m in BATCHES:
            samples = {c: [] for c in configs}
            for _ in range(args.rounds):
                for c in configs:
                    samples[c].append(step_seconds(w, m, c, T, 5))
            t1, tT, ts = (statistics.median(samples[c]) for c in configs)
            flops = 6 * m * w * w
            rows.append({"w": w, "m": m, "blas1_s": t1, "blasT_s": tT, "splitT_s": ts,
                         "R1": flops / t1, "RT": flops / tT, "Rsplit": flops / ts})
            print(f"{w:>5} {m:>5} {flops / t1 / 1e9:>9.2f} {flops / tT / 1e9:>9.2f} "
                  f"{flops / ts / 1e9:>10.2f} {t1 / tT:>11.2f} {tT / ts:>15.2f}")
    print("reduction and hand-offs per gradient value and extra slice (split/T at batch T "
          "less blas/1 at batch 1):")
    for w in WIDTHS:
        split = statistics.median(step_seconds(w, T, Config(T, T), T, 5)
                                  for _ in range(args.rounds))
        one = statistics.median(step_seconds(w, 1, Config(1), T, 5) for _ in range(args.rounds))
        values = (w * w + w) * (T - 1) / T
        c_red = max(0.0, split - one) / values
        rows.append({"w": w, "c_red_s": c_red, "split_batch_T_s": split, "blas1_batch_1_s": one})
        print(f"  w {w:>5}: {c_red * 1e9:.2f} ns per value ({split * 1e6:.1f} us against "
              f"{one * 1e6:.1f} us)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": T, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
