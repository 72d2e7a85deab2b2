"""Time ckpt.plan: how long planning takes for long equal chains and for uneven ones.

    python bench/bench_plan.py            # the quick cases (about 30 s)
    python bench/bench_plan.py --slow     # also 100-200 uneven layers the slow way (~15 min)

Prints one line per case: the chain, the budget (as a fraction of the way from the smallest
feasible budget to the plain-backprop peak), the method, the seconds, and the extra compute of
the plan as a share of one forward pass. Nothing is asserted; timings are one core, one run.
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np

from ckpt import plan as planmod
from ckpt.plan._chain import _chain

BATCH, DTYPE = 64, np.float32


def tapered(n: int) -> list:
    """An MLP funnel: 784 -> 2048 x q -> 1024 x q -> 512 x q -> 256 x rest -> 10."""
    q = n // 4
    return [784] + [2048] * q + [1024] * q + [512] * q + [256] * (n - 1 - 3 * q) + [10]


def random_widths(n: int, seed: int = 1) -> list:
    rng = random.Random(seed)
    return [rng.randint(256, 4096) for _ in range(n + 1)]


def budget_at(widths: list, fraction: float) -> int:
    c = _chain(widths, BATCH, DTYPE)
    return c.min_budget + int(fraction * (c.plain_peak - c.min_budget))


def run(label: str, widths: list, fractions: tuple, method: str) -> None:
    for fraction in fractions:
        budget = budget_at(widths, fraction)
        start = time.perf_counter()
        p = planmod.plan(widths, BATCH, budget, DTYPE, method=method)
        seconds = time.perf_counter() - start
        share = 100 * p.recompute_flops / p.plain_forward_flops
        proven = "proven" if p.proven_optimal else ""
        print(f"{label:<28} budget {fraction:>4.0%}  {method:<10} {seconds:8.3f} s   "
              f"+{share:6.1f}% forward   {len(p.ops):>8} ops  {proven}", flush=True)


def run_tradeoff(label: str, widths: list, method: str) -> None:
    start = time.perf_counter()
    curve = planmod.tradeoff(widths, BATCH, DTYPE, method=method)
    seconds = time.perf_counter() - start
    print(f"{label:<28} tradeoff ({len(curve)} budgets) {method:<10} {seconds:8.3f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="include the cases that take minutes")
    args = parser.parse_args()

    equal = [512] * 1001
    n = len(equal) - 1
    for slots in (3, 4, 10, 32, n // 4, n // 2, n + 1):
        budget = slots * BATCH * 512 * 4
        start = time.perf_counter()
        p = planmod.plan(equal, BATCH, budget, DTYPE)
        seconds = time.perf_counter() - start
        share = 100 * p.recompute_flops / p.plain_forward_flops
        print(f"{'1000 equal layers':<28} {slots:>5} slots  {'optimal':<10} {seconds:8.3f} s   "
              f"+{share:6.1f}% forward   {len(p.ops):>8} ops", flush=True)
    run_tradeoff("1000 equal layers", equal, "optimal")

    fractions = (0.05, 0.2, 0.5, 0.8)
    # The default method on the chains of issue 9: must stay interactive (< 2 s).
    run("200 tapered layers", tapered(200), fractions, "auto")
    run("200 random-width layers", random_widths(200), fractions, "auto")
    run("50 random-width layers", random_widths(50), fractions, "auto")
    for layers in (50, 100, 200):
        run(f"{layers} tapered layers", tapered(layers), fractions, "persistent")
    run_tradeoff("200 tapered layers", tapered(200), "persistent")
    run("50 tapered layers", tapered(50), fractions, "optimal")
    run("50 random-width layers", random_widths(50), fractions, "persistent")
    run("50 random-width layers", random_widths(50), fractions, "optimal")
    if args.slow:
        run("100 tapered layers", tapered(100), fractions, "optimal")
        run("200 tapered layers", tapered(200), fractions, "optimal")
        run("100 random-width layers", random_widths(100), fractions, "persistent")
        run("200 random-width layers", random_widths(200), (0.05, 0.5), "persistent")


if __name__ == "__main__":
    main()
