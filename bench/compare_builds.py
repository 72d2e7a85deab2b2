"""Is a build of ckpt slower than another? Step times of the benchmark workloads, side by side.

    python bench/compare_builds.py --before OLD/.venv/bin/python --after NEW/.venv/bin/python
                                   [--rounds 7] [--seconds 1.5] [--threads 2]
                                   [--workloads small,medium,large,deep] [--instructions]

Each interpreter imports its own ckpt. For every workload and checkpoint interval (1 and
floor(sqrt(D))), the two builds take turns (before, after, before, after, ...), each round in a
fresh process that warms up and then times training steps (zero_grad, forward, MSE gradient,
backward without the input gradient, SGD update) for --seconds. The table gives the median
step time of each build over all its rounds, the range of the per-round medians, and the ratio
after / before (below 1.03: within 3%).

``--instructions`` counts instead of timing: each build runs the same steps under valgrind's
callgrind at one thread, twice (3 and 3 + N steps after the same warm-up), and the difference is
the instructions of N steps, Python included -- repeatable whatever else the machine is doing,
so it answers "not slower" on a loaded machine where times move by 2x (instructions are not
time: memory stalls and SIMD width do not show).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads as wl  # noqa: E402

# Runs in the interpreter under test: only the public API both builds have.
TIMER = r"""
import json, sys, time
import numpy as np
import ckpt
depth, width, batch, k, threads = (int(a) for a in sys.argv[1:6])
seconds = float(sys.argv[6])
ckpt.set_num_threads(threads)
rng = np.random.default_rng(20240607)
layers = [ckpt.Dense(width, width, "relu" if i < depth - 1 else None, rng=rng)
          for i in range(depth)]
model = ckpt.SegmentCheckpointer(layers, k)
x = rng.standard_normal((batch, width)).astype(np.float32)
t = rng.standard_normal((batch, width)).astype(np.float32)

def step():
    model.zero_grad()
    y = model.forward(x)
    model.backward((2.0 / y.size) * (y - t), input_grad=False)
    model.update(1e-3)

for _ in range(5):
    step()
times = []
end = time.perf_counter() + seconds
while time.perf_counter() < end or len(times) < 5:
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


# Runs N steps after a warm-up of 3, at one thread (OpenBLAS's spinning threads would count).
COUNTER = TIMER.split("for _ in range(5):")[0] + r"""
for _ in range(3 + int(sys.argv[7])):
    step()
"""


def step_instructions(python: str, w: wl.Workload, k: int, steps: int) -> float:
    """Instructions per step: callgrind's totals for 3 + steps and 3 steps, differenced."""
    totals = []
    for n in (0, steps):
        out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                              python, "-c", COUNTER, str(w.depth), str(w.width), str(w.batch),
                              str(k), "1", "0", str(n)],
                             check=True, capture_output=True, text=True, cwd="/",
                             env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        line = next(l for l in out.stderr.splitlines() if "Collected" in l)
        totals.append(int(line.split(":")[-1].replace(",", "")))
    return (totals[1] - totals[0]) / steps


def round_times(python: str, w: wl.Workload, k: int, seconds: float, threads: int) -> list:
    out = subprocess.run([python, "-c", TIMER, str(w.depth), str(w.width), str(w.batch), str(k),
                          str(threads), str(seconds)],
                         check=True, capture_output=True, text=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="python of the reference build")
    p.add_argument("--after", required=True, help="python of the build under test")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workloads", default="small,medium,large,deep")
    p.add_argument("--instructions", type=int, nargs="?", const=4, default=0, metavar="N",
                   help="count instructions of N steps under callgrind instead (default N 4)")
    args = p.parse_args(argv)
    if args.instructions:
        print("| workload | k | before instructions / step | after | after / before |")
        print("|---|---|---|---|---|")
        for name in args.workloads.split(","):
            w = wl.WORKLOADS[name]
            for k in w.intervals:
                counts = [step_instructions(getattr(args, label), w, k, args.instructions)
                          for label in ("before", "after")]
                print(f"| {name} ({w.depth}x{w.width}, {w.batch}) | {k} | {counts[0]:,.0f} | "
                      f"{counts[1]:,.0f} | {counts[1] / counts[0]:.4f} |", flush=True)
        return
    print("| workload | k | before ms median [round medians] | after ms median [round medians] "
          "| after / before |")
    print("|---|---|---|---|---|")
    for name in args.workloads.split(","):
        w = wl.WORKLOADS[name]
        for k in w.intervals:
            samples = {"before": [], "after": []}
            rounds = {"before": [], "after": []}
            for _ in range(args.rounds):
                for label in ("before", "after"):
                    times = round_times(getattr(args, label), w, k, args.seconds, args.threads)
                    samples[label] += times
                    rounds[label].append(statistics.median(times))
            med = {label: statistics.median(samples[label]) * 1e3 for label in samples}
            cells = [f"{med[label]:.3g} [{min(rounds[label]) * 1e3:.3g}-"
                     f"{max(rounds[label]) * 1e3:.3g}]" for label in ("before", "after")]
            print(f"| {name} ({w.depth}x{w.width}, {w.batch}) | {k} | {cells[0]} | {cells[1]} "
                  f"| {med['after'] / med['before']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
