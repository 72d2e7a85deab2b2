"""Planned schedule against uniform segments at the same memory budget, on ckpt itself.

For each chain, the budget is the peak of floor(sqrt(D)) uniform segments; ckpt.plan finds the
least recomputation under it. Prints extra FLOPs and the median step time (forward + backward,
alternating the two models, 15 rounds) as a Markdown table.

    python bench/plan_vs_uniform.py
"""
import math
import time

import numpy as np

import ckpt
from ckpt.plan import plan, uniform_plan

BATCH = 64
CHAINS = {
    "deep, 256 x (256 -> 256)": [256] * 257,
    "uneven funnel, 32 layers 784 -> 2048 ... 256 -> 10":
        [784] + [2048] * 8 + [1024] * 8 + [512] * 8 + [256] * 7 + [10],
}


def build(widths, **schedule):
    layers = [ckpt.Dense(widths[i], widths[i + 1], "relu" if i < len(widths) - 2 else None,
                         rng=i) for i in range(len(widths) - 1)]
    return ckpt.SegmentCheckpointer(layers, **schedule)


def main() -> None:
    print("| chain | schedule | peak activations | extra FLOPs | step ms (median) |")
    print("|---|---|---|---|---|")
    for name, widths in CHAINS.items():
        k = max(1, math.isqrt(len(widths) - 1))
        uniform = uniform_plan(widths, BATCH, k)
        best = plan(widths, BATCH, uniform.peak_bytes)
        models = {f"uniform k={k}": (uniform, build(widths, checkpoint_every=k)),
                  "planned": (best, build(widths, plan=best))}
        rng = np.random.default_rng(0)
        x = rng.standard_normal((BATCH, widths[0]), dtype=np.float32)
        g = rng.standard_normal((BATCH, widths[-1]), dtype=np.float32)
        times = {label: [] for label in models}
        for _ in range(16):
            for label, (_, model) in models.items():
                start = time.perf_counter()
                model.forward(x)
                model.backward(g, input_grad=False)
                times[label].append(time.perf_counter() - start)
        for label, (p, _) in models.items():
            median = np.median(times[label][1:]) * 1e3   # the first round warms up
            print(f"| {name} | {label} | {p.peak_bytes / 2**20:.2f} MiB | "
                  f"{p.recompute_flops / 1e9:.2f} GFLOP | {median:.1f} |")


if __name__ == "__main__":
    main()
