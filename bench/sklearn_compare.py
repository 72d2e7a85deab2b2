"""ckpt.MLPClassifier / MLPRegressor against scikit-learn's, same settings, same number of epochs.

    python bench/sklearn_compare.py [--rounds R] [--threads 1 2] [--modes blas split]
                                    [--solver adam|lbfgs] [--quick]

Two workloads, as in issue 13:

- digits (scikit-learn's bundled 1,797 8x8 images, 80/20 stratified split, X / 16): 8 hidden
  layers of 256, relu, batch 64, 30 epochs, Adam; test accuracy;
- regression: ``make_regression`` with 20,000 rows and 20 features (noise 10, 80/20 split,
  standardised): 2 hidden layers of 256, batch 200, 20 epochs, Adam; test R^2.

Contenders: scikit-learn and ckpt, each fitting the same X in float32 and in float64 (X is cast
before the fit, so scikit-learn computes in that dtype too: it keeps float32 input in float32),
each at 1 and 2 BLAS threads. ``--solver lbfgs`` runs both with solver="lbfgs" (full batch)
instead of Adam. Every fit runs in its own process (one BLAS pool per process), with
``n_iter_no_change=inf`` so that every contender runs exactly the same number of epochs
(checked; lbfgs: the same max_iter, iterations reported). Rounds alternate the contenders; the
table shows the median fit time (min-max) and the speed-up over scikit-learn at the same
thread count and dtype. OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE are unset for the workers. Wall times on a shared machine are noisy: compare
the ratios of one run, not absolute times across runs.

``--modes`` runs ckpt in each of ckpt's threading modes at more than one thread (ckpt.threads:
"blas" threads each GEMM, "split" cuts the batch across ckpt's pool). The table also gives each
fit's GEMM work (forward, backward and ckpt's recomputed forwards: 2 FLOPs per multiply-add)
and its rate, and, measured first, ckpt's OpenBLAS sgemm and dgemm rate on one square GEMM at
each thread count: the compute bound of a fit on this machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np

WORKLOADS = {
    "digits": dict(hidden_layer_sizes=(256,) * 8, batch_size=64, max_iter=30),
    "regression": dict(hidden_layer_sizes=(256, 256), batch_size=200, max_iter=20),
}


def _data(name: str, quick: bool):
    from sklearn.datasets import load_digits, make_regression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    if name == "digits":
        X, y = load_digits(return_X_y=True)
        X = X / 16.0
        return train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    X, y = make_regression(2_000 if quick else 20_000, 20, noise=10.0, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(X_train)
    scale = y_train.std()
    return scaler.transform(X_train), scaler.transform(X_test), y_train / scale, y_test / scale


def fit_gemm_flops(units: list, rows: int, epochs: int, recompute_fraction: float = 0.0) -> int:
    """GEMM FLOPs of a fit: per sample and layer, 2 in*out for the forward, as much for the
    weight gradient and for the input gradient (none for the first layer), plus the recomputed
    forwards (``recompute_fraction`` of a plain step's 3 forward passes, as
    ``memory_report_["recompute_flops_fraction"]`` gives it)."""
    forward = sum(2 * a * b for a, b in zip(units[:-1], units[1:]))
    step = 3 * forward - 2 * units[0] * units[1]
    return round(epochs * rows * (step + recompute_fraction * 3 * forward))


def gemm_peak(n: int, reps: int = 5) -> dict:
    """ckpt's OpenBLAS on one n x n x n GEMM per dtype, at its current thread count: GFLOP/s of
    the best of ``reps`` calls after a warm-up."""
    from ckpt import _core
    rates = {}
    for dtype in ("float32", "float64"):
        rng = np.random.default_rng(0)
        x, w = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
        b, y = np.zeros(n, dtype), np.empty((n, n), dtype)
        _core.dense_forward(x, w, b, y)
        best = np.inf
        for _ in range(reps):
            start = time.perf_counter()
            _core.dense_forward(x, w, b, y)
            best = min(best, time.perf_counter() - start)
        rates[dtype] = 2 * n ** 3 / best / 1e9
    return rates


def worker(library: str, dtype: str, threads: int, workload: str, quick: bool,
           mode: str = "blas", solver: str = "adam") -> dict:
    """One fit in this process; returns its time, test score, number of epochs and GEMM FLOPs."""
    from threadpoolctl import threadpool_info, threadpool_limits
    X_train, X_test, y_train, y_test = (a.astype(dtype) if a.dtype.kind == "f" else a
                                        for a in _data(workload, quick))
    params = dict(WORKLOADS[workload], solver=solver, random_state=0, n_iter_no_change=np.inf)
    if solver == "lbfgs":
        del params["n_iter_no_change"]
    if quick:
        params["max_iter"] = 2
    kind = "MLPClassifier" if workload == "digits" else "MLPRegressor"
    modes = contextlib.nullcontext()
    if library == "ckpt":
        import ckpt
        model = getattr(ckpt, kind)(dtype=dtype, n_threads=threads, **params)
        modes = ckpt.threading_mode(mode)
    else:
        from sklearn import neural_network
        model = getattr(neural_network, kind)(**params)
    with threadpool_limits(limits=threads), warnings.catch_warnings(), modes:
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        model.fit(X_train, y_train)
        seconds = time.perf_counter() - start
        score = model.score(X_test, y_test)
    blas = sorted({f"{p.get('internal_api')}:{p.get('architecture')}" for p in threadpool_info()
                   if p.get("user_api") == "blas"})
    recompute = model.memory_report_["recompute_flops_fraction"] if library == "ckpt" else 0.0
    units = [X_train.shape[1], *params["hidden_layer_sizes"], model.n_outputs_]
    flops = fit_gemm_flops(units, len(X_train), int(model.n_iter_), recompute)
    return {"seconds": seconds, "score": float(score), "n_iter": int(model.n_iter_),
            "blas": blas, "flops": flops}


def _run_worker(args: list, threads: int, worker: bool = True) -> dict:
    env = dict(os.environ)
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(key, None)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, __file__, *(["--worker"] if worker else []), *args]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _contenders(threads: int, modes: list) -> list:
    """(library, dtype, mode) run at this thread count: ckpt in each mode above one thread."""
    out = []
    for dtype in ("float32", "float64"):
        out += [("scikit-learn", dtype, "")]
        out += [("ckpt", dtype, mode) for mode in (modes if threads > 1 else ["blas"])]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--modes", nargs="+", default=["blas"], choices=["blas", "split", "auto"],
                        help="ckpt's threading modes at more than one thread (default: blas)")
    parser.add_argument("--peak-n", type=int, default=1024,
                        help="size of the square GEMM whose rate is the peak (0: skip)")
    parser.add_argument("--solver", default="adam", choices=["adam", "lbfgs"])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2,000 regression rows")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--peak-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        library, dtype, threads, workload, quick, mode, solver = args.worker
        print(json.dumps(worker(library, dtype, int(threads), workload, quick == "1", mode,
                                solver)))
        return 0
    if args.peak_worker:
        print(json.dumps(gemm_peak(args.peak_worker)))
        return 0

    peaks = {}
    if args.peak_n:
        for threads in args.threads:
            peaks[threads] = _run_worker(["--peak-worker", str(args.peak_n)], threads,
                                         worker=False)
    results: dict = {}
    blas: set = set()
    for _ in range(args.rounds):
        for workload in args.workloads:
            for threads in args.threads:
                for library, dtype, mode in _contenders(threads, args.modes):
                    r = _run_worker([library, dtype, str(threads), workload,
                                     "1" if args.quick else "0", mode or "blas", args.solver],
                                    threads)
                    results.setdefault((workload, threads, library, dtype, mode), []).append(r)
                    blas.update(r["blas"])
                    print(f"  {workload:<10} {threads} thread(s) {library:<12} {dtype} {mode}: "
                          f"{r['seconds']:.2f} s, score {r['score']:.4f}, {r['n_iter']} epochs",
                          file=sys.stderr)

    print("| workload | threads | contender | fit time, median (min-max) | vs scikit-learn "
          "| test score | epochs | GEMM GFLOP | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in args.workloads:
        metric = "accuracy" if workload == "digits" else "R²"
        for threads in args.threads:
            epochs = {r["n_iter"] for key, rs in results.items()
                      if key[:2] == (workload, threads) for r in rs}
            if len(epochs) != 1 and args.solver != "lbfgs":
                raise SystemExit(f"{workload}: the contenders ran different epochs {epochs}")
            for library, dtype, mode in _contenders(threads, args.modes):
                base = np.median([r["seconds"] for r in results[(workload, threads,
                                                                   "scikit-learn", dtype, "")]])
                rs = results[(workload, threads, library, dtype, mode)]
                times = [r["seconds"] for r in rs]
                med = float(np.median(times))
                score = float(np.median([r["score"] for r in rs]))
                name = f"{library} {dtype}" + (f" {mode}" if len(args.modes) > 1 and threads > 1
                                               and mode else "")
                flops = rs[0]["flops"]
                # lbfgs evaluates the loss more often than it iterates: no FLOP count there.
                work = ("n/a | n/a" if args.solver == "lbfgs"
                        else f"{flops / 1e9:.1f} | {flops / med / 1e9:.1f}")
                print(f"| {workload} | {threads} | {name} | {med:.2f} s "
                      f"({min(times):.2f}-{max(times):.2f}) | {base / med:.2f}x "
                      f"| {metric} {score:.4f} | {rs[0]['n_iter']} | {work} |")
    print(f"\nsolver {args.solver}; BLAS: {', '.join(sorted(blas))}; {args.rounds} round(s); "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the end")
    for threads, rates in peaks.items():
        print(f"ckpt's OpenBLAS on one {args.peak_n}³ GEMM at {threads} thread(s): "
              f"sgemm {rates['float32']:.0f} GFLOP/s, dgemm {rates['float64']:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
