"""How ckpt uses the cores inside one training step: batch-split or BLAS threading.

T, the thread count, is :func:`ckpt.get_num_threads` -- the count of ckpt's OpenBLAS, which
:func:`ckpt.set_num_threads` and threadpoolctl set. At import ckpt lowers it to the cores it may
use (:func:`default_num_threads`: the affinity mask and the cgroup CPU quota) unless
``OPENBLAS_NUM_THREADS``, ``GOTO_NUM_THREADS`` or ``OMP_NUM_THREADS`` is set.

Modes (``SegmentCheckpointer(threads_mode=...)``, or :func:`threading_mode` for a block):

- ``"split"``: the compiled executor splits the batch into min(T, batch) contiguous slices of
  rows; each runs the step's forward and backward phases on its own thread of ckpt's pool,
  with single-threaded BLAS. Slice 0 accumulates into the gradients, slice s >= 1 into its own
  copy, then each gradient value is reduced as ((g + slice 0) + slice 1) + ... in that fixed
  order: results depend on T (the split), never on timing.
- ``"blas"`` (the default; the environment variable ``CKPT_THREADS_MODE`` changes the process
  default): one slice; OpenBLAS uses its T threads inside each GEMM.
- ``"auto"``: ``"split"`` when T > 1 and the chain's largest GEMM, batch x n_in x n_out
  of its widest Dense layer, is between ``SPLIT_MIN`` x T and ``SPLIT_CROSSOVER`` x T
  multiply-adds, else ``"blas"``. Both bounds were measured by ``bench/sweep_split.py``: below
  SPLIT_MIN per thread the slices are too small to pay for waking a second core (OpenBLAS then
  runs single-threaded anyway); above SPLIT_CROSSOVER OpenBLAS's own threads are efficient.

The pool's threads claim the slices from one counter, so a slice runs on whichever thread is
free first (the caller takes any a worker has not started): which thread runs a slice never
changes what the slice computes, nor the reduction order above.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Iterator, Optional

MODES = ("split", "blas", "auto")
# "blas" until "auto" is shown to win where it splits. With the bounds below, auto splits only
# the *small* benchmark workload and `ckpt train`'s default model, so the choice rests on what
# the two modes measure there: the step time on small at k = 1 and k = 8, and `ckpt train`'s
# time and tracked peak (split adds a parameter-sized gradient copy per extra thread). Re-run
# them with `python bench/run.py --workloads small` under CKPT_THREADS_MODE=split and =blas, and
# `ckpt train --json --threads-mode split` against `--threads-mode blas`, alternating runs; the
# recorded numbers are on the benchmark page (docs/benchmarks/recorded.md, "Threads").
DEFAULT_MODE = "blas"

# The per-GEMM m*n*k (full batch) per thread between which "auto" splits the batch, from
# `python bench/sweep_split.py` (split against BLAS threads over batch x width, alternating in
# one process). SPLIT_CROSSOVER is the midpoint, in powers of two, of the last size at which
# split always won and the first at which it lost with thin slices on wide layers (each slice
# packs every weight matrix again, and the gradient copies and their reduction cost width^2 per
# slice); some larger sizes with long slices also win, which a bound on m*n*k cannot separate
# from those losses. Below SPLIT_MIN the slices are too small to pay for waking a second core.
# The sweep's recorded results are on the benchmark page (docs/benchmarks/recorded.md, "Threads").
SPLIT_MIN = 64 * 1024
SPLIT_CROSSOVER = 512 * 1024


def check_mode(mode: object, name: str = "threads_mode") -> str:
    """The mode, validated (TypeError / ValueError naming the argument otherwise)."""
    if not isinstance(mode, str):
        raise TypeError(f"{name} must be one of {', '.join(MODES)}, got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _environment_mode() -> str:
    """The process default: CKPT_THREADS_MODE if set (split, blas or auto), else DEFAULT_MODE."""
    value = os.environ.get("CKPT_THREADS_MODE", "").strip()
    return check_mode(value, "CKPT_THREADS_MODE") if value else DEFAULT_MODE


_mode: contextvars.ContextVar = contextvars.ContextVar("ckpt_threading_mode",
                                                       default=_environment_mode())


def get_threading_mode() -> str:
    """The mode in effect in this thread/context: :func:`threading_mode`'s, else the process
    default (DEFAULT_MODE, or CKPT_THREADS_MODE)."""
    return _mode.get()


@contextlib.contextmanager
def threading_mode(mode: str) -> Iterator[str]:
    """Run a block with a threading mode ("split", "blas" or "auto") for the checkpointers that
    do not fix their own; it is per thread (a context variable) and restored on exit."""
    token = _mode.set(check_mode(mode, "mode"))
    try:
        yield mode
    finally:
        _mode.reset(token)


def choose_slices(mode: str, threads: int, batch: int, max_dense_product: int) -> int:
    """Slices of a step: 1 (BLAS threading) or min(threads, batch) (batch split).

    ``max_dense_product`` is the largest n_in * n_out among the chain's Dense layers, so the
    largest GEMM of the step has batch * max_dense_product multiply-adds.
    """
    split = min(threads, batch)
    if split <= 1 or mode == "blas":
        return 1
    if mode == "split":
        return split
    size = batch * max_dense_product
    return split if SPLIT_MIN * threads <= size <= SPLIT_CROSSOVER * threads else 1


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """CPUs the cgroup CPU quota allows (rounded up), or None without a quota.

    Reads cgroup v2's ``cpu.max`` ("max 100000" or "<quota> <period>"), else v1's
    ``cpu/cpu.cfs_quota_us`` and ``cpu/cpu.cfs_period_us`` (quota -1: none).
    """
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def default_num_threads() -> int:
    """The cores ckpt may use: the CPU affinity mask, capped by the cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, limit)
    return max(1, n)


def apply_default_num_threads() -> None:
    """At import: bound ckpt's OpenBLAS by :func:`default_num_threads` unless the environment
    fixes the count (OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS, OMP_NUM_THREADS)."""
    if any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                                       "OMP_NUM_THREADS")):
        return
    from ckpt import _core
    n = default_num_threads()
    if _core.get_num_threads() > n:
        _core.set_num_threads(n)
