"""Draw the README's and the docs' figure: peak activation memory against recomputation.

    python docs/make_figures.py          # writes docs/_static/tradeoff.png

For 64 Dense(256 -> 256) layers at batch 128, float32 (the chain of the memory page), it plots
the planner's curve (ckpt.plan.tradeoff: the least recomputation for each budget) and the
uniform schedules k = 1, 2, 4, 8, 16 (ckpt.plan.uniform_plan). Every number comes from the
element costs, not from a timing, so the figure is the same on every machine. Needs matplotlib
(the docs extra).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ckpt import plan as planner  # noqa: E402

DEPTH, WIDTH, BATCH = 64, 256, 128
OUT = Path(__file__).resolve().parent / "_static" / "tradeoff.png"


def main() -> None:
    widths = [WIDTH] * (DEPTH + 1)
    plain = planner.uniform_plan(widths, BATCH, 1)
    step_flops = 3 * plain.plain_forward_flops  # forward + two backward GEMMs per layer
    mib = 1024 * 1024

    curve = planner.tradeoff(widths, BATCH, points=400)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([budget / mib for budget, _, _ in curve],
            [100 * flops / step_flops for _, flops, _ in curve],
            "-", drawstyle="steps-post", color="tab:blue",
            label="planned: least recomputation within the budget")
    for k in (1, 2, 4, 8, 16):
        p = planner.uniform_plan(widths, BATCH, k)
        ax.plot(p.peak_bytes / mib, 100 * p.recompute_flops / step_flops, "o", color="tab:orange")
        ax.annotate(f"k={k}", (p.peak_bytes / mib, 100 * p.recompute_flops / step_flops),
                    textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.plot([], [], "o", color="tab:orange", label="uniform segments, checkpoint_every=k")
    ax.set_xlabel("activation memory: budget, or a uniform schedule's peak (MiB)")
    ax.set_ylabel("recomputed FLOPs (% of a training step)")
    ax.set_title(f"{DEPTH} Dense({WIDTH} → {WIDTH}) layers, batch {BATCH}, float32")
    ax.set_ylim(0, 60)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, metadata={"Software": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
