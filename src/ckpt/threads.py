"""How ckpt uses the cores inside one training step: batch-split or BLAS threading.

T, the thread count, is :func:`ckpt.get_num_threads` -- the count of ckpt's OpenBLAS, which
:func:`ckpt.set_num_threads` and threadpoolctl set. At import ckpt lowers it to the cores it may
use (:func:`default_num_threads`: the affinity mask and the cgroup CPU quota) unless
``OPENBLAS_NUM_THREADS``, ``GOTO_NUM_THREADS`` or ``OMP_NUM_THREADS`` is set.

Modes (``SegmentCheckpointer(threads_mode=...)``, or :func:`threading_mode` for a block):

- ``"tuned"`` (the default; the environment variable ``CKPT_THREADS_MODE`` changes the process
  default): OpenBLAS threading, at the thread count that measured fastest for the chain and
  batch size on its first training steps, and again when the choice slows down
  (:mod:`ckpt.tuning`). The candidates are OpenBLAS at 1 .. T threads; a candidate whose
  outputs and gradients on the first batch are not bit-equal to OpenBLAS at T threads is
  excluded, so a tuned run computes the bits of ``"blas"`` whichever count wins.
- ``"auto"``: ``"tuned"`` with the batch split among the candidates. A split step sums the
  gradients in another order, so runs whose measurements choose differently may differ in the
  last bits.
- ``"split"``: the compiled executor splits the batch into min(T, batch) contiguous slices of
  rows; each runs the step's forward and backward phases on its own thread of ckpt's pool,
  with single-threaded BLAS. Slice 0 accumulates into the gradients, slice s >= 1 into its own
  copy, then each gradient value is reduced as ((g + slice 0) + slice 1) + ... in that fixed
  order: results depend on T (the split), never on timing.
- ``"blas"``: one slice; OpenBLAS uses its T threads inside each GEMM.

``"blas"`` and ``"split"`` are fixed choices: nothing is measured.

OpenBLAS's thread count is process-wide: the scipy-openblas32 build ckpt pins (0.3.34) exports
``openblas_set_num_threads`` but no per-thread ``openblas_set_num_threads_local``. A tuned step
therefore sets the process's count for each of its phases (:func:`blas_threads`) and puts it
back after; tuned phases that need different counts in parallel threads take turns, and a
``"blas"`` or ``"split"`` step running meanwhile in another thread runs at whatever count is set.

The pool's threads claim the slices from one counter, so a slice runs on whichever thread is
free first (the caller takes any a worker has not started): which thread runs a slice never
changes what the slice computes, nor the reduction order above.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
from typing import Callable, Iterator, Optional

MODES = ("tuned", "auto", "blas", "split")
# Measured per chain: a fixed "blas" lost to one thread on small networks (3.2-3.8x NumPy at one
# thread against 2.3-2.5x at two, 2-core EPYC), and no size rule held across machines.
DEFAULT_MODE = "tuned"
FIXED_MODES = ("blas", "split")


def check_mode(mode: object, name: str = "threads_mode") -> str:
    """The mode, validated (TypeError / ValueError naming the argument otherwise)."""
    if not isinstance(mode, str):
        raise TypeError(f"{name} must be one of {', '.join(MODES)}, got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _environment_mode() -> str:
    """The process default: CKPT_THREADS_MODE if set (one of MODES), else DEFAULT_MODE."""
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
    """Run a block with a threading mode (one of MODES) for the checkpointers that
    do not fix their own; it is per thread (a context variable) and restored on exit."""
    token = _mode.set(check_mode(mode, "mode"))
    try:
        yield mode
    finally:
        _mode.reset(token)


def choose_slices(mode: str, threads: int, batch: int) -> int:
    """Slices of a step in a fixed mode: 1 for "blas", min(threads, batch) for "split"."""
    if mode not in FIXED_MODES:
        raise ValueError(f"choose_slices takes a fixed mode ({', '.join(FIXED_MODES)}), "
                         f"got {mode!r}")
    return 1 if mode == "blas" else max(1, min(threads, batch))


def _openblas_setter():
    """OpenBLAS's own thread-count setter. ckpt.set_num_threads checks its argument against
    the build's MAX_THREADS, read from the config string on every call (3.4 us here, against
    0.5 us for the setting itself): a tuned step sets the count twice per phase, and the
    counts it sets are ones ckpt.set_num_threads accepted."""
    import ctypes
    import scipy_openblas32
    lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(),
                                   f"lib{scipy_openblas32.get_library()}.so"))
    setter = lib.scipy_openblas_set_num_threads
    setter.argtypes, setter.restype = [ctypes.c_int], None
    return setter


class _BlasThreads:
    """The process's OpenBLAS thread count, held by the phases that need a count of their own.

    Holders of one count overlap; a holder of another count waits until they are done. The
    first holder saves the count it found, the last one puts it back -- unless it was changed
    meanwhile (ckpt.set_num_threads), which is then kept.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()          # entered on every phase: a C-level lock
        self._turn = threading.Condition(self._lock)
        self._holders = 0
        self._count = 0
        self._saved = 0
        self._set: Optional[Callable[[int], None]] = None

    def acquire(self, n: int) -> None:
        with self._lock:
            while self._holders and self._count != n:
                self._turn.wait()
            if self._holders == 0:
                if self._set is None:
                    from ckpt import _core
                    self._get, self._set = _core.get_num_threads, _openblas_setter()
                self._saved = self._get()
                if self._saved != n:
                    self._set(n)
                self._count = n
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                if self._saved != self._count and self._get() == self._count:
                    self._set(self._saved)
                self._turn.notify_all()

    @contextlib.contextmanager
    def held(self, n: int) -> Iterator[None]:
        self.acquire(n)
        try:
            yield
        finally:
            self.release()

    def requested(self) -> int:
        """T: the count in effect outside the holds (what set_num_threads last asked for)."""
        from ckpt import _core
        with self._lock:
            return self._saved if self._holders else _core.get_num_threads()


_BLAS = _BlasThreads()


def blas_threads(n: int):
    """Context manager: run a block with OpenBLAS at n threads (process-wide; see above)."""
    return _BLAS.held(n)


def hold_blas_threads(n: int) -> None:
    """:func:`blas_threads` without a context manager: pair with :func:`release_blas_threads`."""
    _BLAS.acquire(n)


def release_blas_threads() -> None:
    """End a :func:`hold_blas_threads`: the last holder puts the count back."""
    _BLAS.release()


def requested_num_threads() -> int:
    """T for choosing a step's configuration: ckpt.get_num_threads() outside the tuned phases
    that hold another count."""
    return _BLAS.requested()


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
