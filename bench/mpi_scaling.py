"""Data-parallel scaling of ckpt under MPI: measured on this machine, modelled for a cluster.

    python bench/mpi_scaling.py [--quick] [--workloads small,medium,large,deep] [--ranks 1,2,4]
                                [--seconds 1.5] [--network-gbps 10] [--json FILE]

Needs mpi4py and an MPI library (pip install 'ckpt-cpu[mpi]'); mpiexec is taken from beside the
Python executable, else from PATH. It prints three tables:

1. **Throughput** at 1, 2 and 4 ranks for each bench workload (bench/workloads.py: float32 ReLU
   MLPs, MSE, SGD) at a fixed *global* batch B split over the ranks (strong scaling): the step
   time, rows per second, and the allreduce's time against the step's compute. Each rank runs
   ``cores // ranks`` BLAS threads (at least 1), as ``mpiexec -n K ckpt train`` does; 4 ranks on a
   2-core machine are oversubscribed, so their times measure contention, not scaling.
2. **Allreduce** of 1 KB to 100 MB at 2 ranks, and the least-squares fit (in relative error)
   t(m) = alpha + m / bandwidth.
3. **Model** of a step at K machines, one rank per machine using all its cores:

       cost(K) = compute(1) / K + allreduce(K),
       allreduce(K) = 2 (K - 1) alpha + 2 (K - 1) / K * gradient_bytes / network_bandwidth

   (a ring allreduce: every byte crosses the network twice). compute(1) is the measured 1-rank
   step without the allreduce; alpha is the fitted on-machine latency (optimistic for a real
   network); the network bandwidth is an assumption, 10 Gb/s by default. compute / K is
   optimistic too: smaller per-rank batches run GEMMs less efficiently. Data parallelism stops
   paying where the parallel efficiency cost(1) / (K cost(K)) falls below one half; the best K is
   where cost(K) is least.

The machine is shared and small: absolute times move by tens of percent between runs; the
ratios inside one run are what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads as wl  # noqa: E402

SIZES = [2 ** 10 * 4 ** i for i in range(9)] + [100 * 2 ** 20]   # 1 KiB ... 64 MiB, 100 MiB
QUICK_SIZES = [2 ** 10, 2 ** 12, 2 ** 14, 2 ** 16]


# ------------------------------------------------------------------------------------ workers
# Run under mpiexec; rank 0 prints one line of JSON.

def _world():
    from ckpt import distributed
    return distributed.world_comm()


def worker_step(name: str, seconds: float, threads: int, quick: bool) -> None:
    """Time data-parallel steps of workload `name`, global batch split over the ranks."""
    import ckpt
    from ckpt import distributed

    comm = _world()
    size, rank = comm.Get_size(), comm.Get_rank()
    world = distributed.detect_world() or distributed.World(size, rank, size, rank)
    threads = threads or distributed.default_threads(world)
    ckpt.set_num_threads(threads)
    w = _workload(name, quick)
    model = ckpt.SegmentCheckpointer(wl.ckpt_dense_layers(w), checkpoint_every=1)
    optimizer = ckpt.SGD(model, wl.LEARNING_RATE)
    replicas = distributed.DataParallel(comm, model, optimizer)
    x, t = wl.batch_data(w)
    (rows, _, global_rows), = distributed.shard_batches(np.arange(w.batch), -(-w.batch // size),
                                                       size, rank)
    xb, tb = x[rows], t[rows]
    g = np.empty_like(tb)
    scale = np.float32(2.0 / (max(len(rows), 1) * w.width))   # MSE: the mean over this rank's rows

    def step():
        t0 = time.perf_counter()
        optimizer.zero_grad()
        y = model.forward(xb)
        np.subtract(y, tb, out=g)
        np.multiply(g, scale, out=g)
        model.backward(g, input_grad=False)
        t1 = time.perf_counter()
        comm.Barrier()   # the wait for the slowest rank, apart from the allreduce itself
        t2 = time.perf_counter()
        replicas.allreduce_gradients(len(rows), global_rows, 0.0, 0)
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        return t1 - t0 + (t4 - t3), t2 - t1, t3 - t2, t4 - t0

    for _ in range(3):
        step()
    comm.Barrier()
    start = time.perf_counter()
    step()
    steps = comm.bcast(max(5, int(seconds / max(time.perf_counter() - start, 1e-6))), root=0)
    times = np.array([step() for _ in range(steps)])
    medians = np.median(times, axis=0)
    per_rank = comm.gather(medians.tolist(), root=0)
    replicas.check_replicas()
    if rank == 0:
        compute = max(m[0] for m in per_rank)
        print(json.dumps({
            "workload": name, "ranks": size, "threads_per_rank": threads, "steps": steps,
            "global_batch": w.batch, "rows_per_rank": -(-w.batch // size),
            "parameters": int(sum(p.size for p in model.params())),
            "compute_s": compute, "wait_s": float(medians[1]), "allreduce_s": float(medians[2]),
            "step_s": float(medians[3]), "step_min_s": float(times[:, 3].min()),
            "step_max_s": float(times[:, 3].max()),
        }))


def worker_allreduce(sizes, seconds: float) -> None:
    """Median in-place Allreduce(SUM) time of float32 buffers of the given byte sizes."""
    from ckpt import distributed

    comm = _world()
    MPI = distributed.import_mpi()
    out = []
    for nbytes in sizes:
        buf = np.ones(nbytes // 4, np.float32)
        comm.Barrier()
        start = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf)
        first = time.perf_counter() - start
        reps = comm.bcast(int(min(200, max(5, seconds / max(first, 1e-7)))), root=0)
        times = []
        for _ in range(reps):
            comm.Barrier()
            start = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf)
            times.append(time.perf_counter() - start)
        out.append({"bytes": nbytes, "reps": reps, "median_s": float(np.median(times)),
                    "min_s": float(np.min(times)), "max_s": float(np.max(times))})
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "allreduce": out}))


def _workload(name: str, quick: bool = False) -> wl.Workload:
    for w in wl.QUICK if quick else wl.FULL:
        if w.name == name:
            return w
    raise ValueError(f"unknown workload {name!r}")


# ------------------------------------------------------------------------------------ driver

def mpiexec() -> str:
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        raise SystemExit("mpiexec not found: pip install 'ckpt-cpu[mpi]'")
    return found


def launch(ranks: int, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE",
                                                            "OPENBLAS_L2_SIZE")}
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, str(Path(__file__).resolve())] + args
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit_latency_bandwidth(points) -> tuple:
    """alpha (s) and bandwidth (bytes/s) of t = alpha + m / bandwidth, least relative error."""
    m = np.array([p["bytes"] for p in points], float)
    t = np.array([p["median_s"] for p in points], float)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([1 / t, m / t], axis=1), np.ones_like(t),
                                        rcond=None)
    if alpha < 0:     # noise: refit the slope alone through the origin
        alpha, beta = 0.0, float(np.sum(m / t) / np.sum((m / t) ** 2))
    if beta <= 0:     # noise (small messages only): the largest message's rate
        alpha, beta = float(t.min()), float(t[-1] / m[-1])
    return float(alpha), 1.0 / float(beta)


def ring_allreduce_s(k: int, nbytes: float, alpha: float, bandwidth: float) -> float:
    if k == 1:
        return 0.0
    return 2 * (k - 1) * alpha + 2 * (k - 1) / k * nbytes / bandwidth


def model_row(compute1: float, nbytes: float, alpha: float, bandwidth: float,
              max_k: int = 1024) -> dict:
    cost = {k: compute1 / k + ring_allreduce_s(k, nbytes, alpha, bandwidth)
            for k in range(1, max_k + 1)}
    best = min(cost, key=cost.get)
    efficient = [k for k in cost if compute1 / (k * cost[k]) >= 0.5]
    return {"cost_2_s": cost[2], "speedup_2": compute1 / cost[2], "best_k": best,
            "best_speedup": compute1 / cost[best], "last_k_efficiency_50": max(efficient),
            "allreduce_limit_s": 2 * nbytes / bandwidth}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--workloads", default=None)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=1.5, help="timed seconds per run")
    parser.add_argument("--threads", type=int, default=0,
                        help="BLAS threads per rank (default cores // ranks on the node)")
    parser.add_argument("--network-gbps", type=float, default=10.0)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--worker", choices=["step", "allreduce"], help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "step":
        worker_step(args.workload, args.seconds, args.threads, args.quick)
        return 0
    if args.worker == "allreduce":
        worker_allreduce([int(s) for s in args.sizes.split(",")], args.seconds / 10)
        return 0

    names = (args.workloads.split(",") if args.workloads
             else [w.name for w in (wl.QUICK if args.quick else wl.FULL)])
    ranks = [int(k) for k in args.ranks.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    common = ["--seconds", str(args.seconds), "--threads", str(args.threads)] + \
        (["--quick"] if args.quick else [])

    runs = [launch(k, ["--worker", "step", "--workload", name] + common)
            for name in names for k in ranks]
    sizes = QUICK_SIZES if args.quick else SIZES
    sweep = launch(2, ["--worker", "allreduce", "--sizes", ",".join(map(str, sizes)),
                       "--seconds", str(args.seconds)])["allreduce"]
    alpha, bandwidth_fit = fit_latency_bandwidth(sweep)
    network = args.network_gbps * 1e9 / 8

    print(f"# ckpt data-parallel scaling ({cores} cores; MPI ranks x BLAS threads as listed; "
          f"noisy shared machine)\n")
    print("## Throughput at a fixed global batch (strong scaling)\n")
    print("| workload (D×W, B) | ranks | threads/rank | rows/rank | step ms | rows/s | "
          "speedup | compute ms | wait ms | allreduce ms | allreduce / compute |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for r in runs:
        w = _workload(r["workload"], args.quick)
        base.setdefault(r["workload"], r["step_s"])
        over = " (oversubscribed)" if r["ranks"] * r["threads_per_rank"] > cores else ""
        print(f"| {w.name} ({w.depth}×{w.width}, {w.batch}) | {r['ranks']}{over} | "
              f"{r['threads_per_rank']} | {r['rows_per_rank']} | {1e3 * r['step_s']:.2f} | "
              f"{w.batch / r['step_s']:,.0f} | {base[r['workload']] / r['step_s']:.2f} | "
              f"{1e3 * r['compute_s']:.2f} | {1e3 * r['wait_s']:.2f} | "
              f"{1e3 * r['allreduce_s']:.3f} | {r['allreduce_s'] / r['compute_s']:.1%} |")
    print("\n## Allreduce (2 ranks, this machine, in place, float32 SUM)\n")
    print("| bytes | median ms | min ms | GB/s (bytes / median) |")
    print("|---:|---:|---:|---:|")
    for p in sweep:
        print(f"| {_bytes(p['bytes'])} | {1e3 * p['median_s']:.3f} | {1e3 * p['min_s']:.3f} | "
              f"{p['bytes'] / p['median_s'] / 1e9:.2f} |")
    print(f"\nfit t(m) = alpha + m / bandwidth: alpha = {1e6 * alpha:.1f} µs, "
          f"bandwidth = {bandwidth_fit / 1e9:.2f} GB/s (on one machine, shared memory)\n")
    print(f"## Model at K machines on a {args.network_gbps:g} Gb/s network (assumed; "
          f"{network / 1e9:.2f} GB/s, latency alpha from the fit)\n")
    print("| workload | gradient MB | compute(1) ms | allreduce(K→∞) ms | speedup K=2 | "
          "best K | speedup at best K | efficiency ≥ 50% up to K |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    model = []
    for name in names:
        one = next(r for r in runs if r["workload"] == name and r["ranks"] == 1)
        nbytes = 4 * one["parameters"]
        row = model_row(one["compute_s"], nbytes, alpha, network)
        row.update(workload=name, gradient_bytes=nbytes, compute_1_s=one["compute_s"])
        model.append(row)
        print(f"| {name} | {nbytes / 1e6:.1f} | {1e3 * one['compute_s']:.2f} | "
              f"{1e3 * row['allreduce_limit_s']:.1f} | {row['speedup_2']:.2f} | "
              f"{row['best_k']} | {row['best_speedup']:.2f} | "
              f"{row['last_k_efficiency_50'] if row['speedup_2'] >= 1 else 'never pays'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cores": cores, "runs": runs, "allreduce": sweep,
            "fit": {"alpha_s": alpha, "bandwidth_Bps": bandwidth_fit},
            "network_Bps": network, "model": model}, indent=1))
    return 0


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            value = n / size
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
