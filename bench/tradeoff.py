"""Memory against compute for segment checkpointing: the README's table.

64 Dense(256 -> 256, relu) layers, batch 128, float32. For each checkpoint_every, one training
step is measured with tracemalloc (bytes held at its peak, workspaces kept across steps included,
minus parameters, gradients and the input), and timed (median of 15 steps).

    python bench/tradeoff.py
"""
import time
import tracemalloc

import numpy as np

import ckpt

N, WIDTH, BATCH = 64, 256, 128


def measure(k: int, x: np.ndarray, g: np.ndarray) -> tuple:
    model = ckpt.SegmentCheckpointer([ckpt.Dense(WIDTH, WIDTH, "relu", rng=i) for i in range(N)], k)
    model.forward(x)
    model.backward(g)  # warm-up: the workspaces kept across steps now exist
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    y = model.forward(x)
    grad_input = model.backward(g)
    del y, grad_input
    peak = tracemalloc.get_traced_memory()[1] - base + model._runner()._grad_buffers.nbytes
    tracemalloc.stop()
    times = []
    for _ in range(15):
        start = time.perf_counter()
        model.forward(x)
        model.backward(g)
        times.append(time.perf_counter() - start)
    return peak, len(model.schedule(BATCH).recomputed_layers), float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, WIDTH), dtype=np.float32)
    g = rng.standard_normal((BATCH, WIDTH), dtype=np.float32)
    rows = [(k, *measure(k, x, g)) for k in (1, 2, 4, 8, 16, 0)]
    plain_peak, plain_time = rows[0][1], rows[0][3]
    print("| checkpoint_every | recomputed layer forwards | extra FLOPs per step "
          "| activation memory | vs plain | step time | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for k, peak, recomputed, seconds in rows:
        # A step is 3 GEMMs per layer (1 forward, 2 backward); a recomputed layer adds one.
        print(f"| {k} | {recomputed} of {N} | +{recomputed / (3 * N):.0%} | "
              f"{peak / 2**20:.2f} MiB | {peak / plain_peak:.2f} | {seconds * 1e3:.1f} ms | "
              f"{seconds / plain_time:.2f} |")


if __name__ == "__main__":
    main()
