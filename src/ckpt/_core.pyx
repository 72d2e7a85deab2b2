# Typed kernels of ckpt: the chain executor that runs a checkpointing schedule without touching
# Python per element, the element kinds it runs (Dense, LayerNorm, Dropout, Residual, each in its
# own .pxi), parameter updates, and the tracker's atomic counters.
#
# Each kernel has two layers (as in scikit-learn's _cython_blas): a `noexcept nogil` function on raw
# pointers, and a thin wrapper that validates shapes with the GIL held, then releases it.
# The pure-NumPy twin of every kernel is ckpt._reference. The elementwise loops are C
# (_simd_kernels.h), compiled for several instruction sets and chosen at run time (_simd.h).

from cython cimport floating
from libc.stdint cimport int64_t
from libc.limits cimport INT_MAX
from libc.string cimport memset
from cpython.mem cimport PyMem_Malloc, PyMem_Free

from ._blas cimport (
    CblasRowMajor, CblasNoTrans, CblasTrans, CBLAS_TRANSPOSE,
    scipy_cblas_sgemm, scipy_cblas_dgemm,
    scipy_openblas_set_num_threads, scipy_openblas_get_num_threads, scipy_openblas_get_config,
)
from ._simd cimport (
    ACT_IDENTITY, ACT_COUNT, SIMD_COUNT, ckpt_act_name, ckpt_simd_kernels, ckpt_simd_supported,
    ckpt_simd_best, ckpt_simd_select, ckpt_simd_active, ckpt_simd_name,
)

import numbers
import os
import warnings

import numpy as np

# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------

def activation_names():
    """The activation codes' names, in code order (the C enum of _simd.h; ckpt.activations
    is the table built on them)."""
    return tuple(ckpt_act_name(i).decode("ascii") for i in range(ACT_COUNT))


# The codes, each activation's forward and its derivative are in _simd_kernels.h, side by side.


# --------------------------------------------------------------------------------------------
# Checks shared by the kernels' wrappers
# --------------------------------------------------------------------------------------------

cdef int _check_blas_dim(Py_ssize_t value, str what) except -1:
    if value > INT_MAX:
        raise ValueError(f"{what} = {value} exceeds the 32-bit BLAS limit {INT_MAX}")
    return 0


cdef int _check_act(int act, double alpha) except -1:
    if act < 0 or act >= ACT_COUNT:
        raise ValueError(f"unknown activation code {act}")
    return 0


# --------------------------------------------------------------------------------------------
# Parameter updates
# --------------------------------------------------------------------------------------------

cdef void sgd_step_ptr(floating *p, const floating *g, Py_ssize_t n, floating lr) noexcept nogil:
    """p -= lr * g"""
    if floating is float:
        ckpt_simd_kernels().sgd_step_f(p, g, n, lr)
    else:
        ckpt_simd_kernels().sgd_step_d(p, g, n, lr)


def sgd_step(floating[::1] p, const floating[::1] g, double lr):
    """p -= lr * g, in place."""
    if p.shape[0] != g.shape[0]:
        raise ValueError(f"parameter has {p.shape[0]} values but its gradient has {g.shape[0]}")
    if p.shape[0] == 0:
        return
    with nogil:
        sgd_step_ptr(&p[0], &g[0], p.shape[0], <floating>lr)


# --------------------------------------------------------------------------------------------
# BLAS threads
# --------------------------------------------------------------------------------------------

def get_num_threads():
    """Number of threads ckpt's OpenBLAS uses (the T of batch-split steps).

    While a batch-split job of ckpt's pool runs, OpenBLAS is set to one thread for it; this
    still reports the count the job restores afterwards.
    """
    cdef int saved = ckpt_pool_blas_threads()
    return saved if saved > 0 else scipy_openblas_get_num_threads()


def max_num_threads():
    """The most threads ckpt's OpenBLAS can run: MAX_THREADS of its build.

    OpenBLAS reports it in its config string ("... MAX_THREADS=64") and silently clamps any
    larger request to it. More threads than cores (oversubscription) is allowed up to there.
    """
    config = scipy_openblas_get_config().decode("ascii", "replace")
    for field in config.split():
        if field.startswith("MAX_THREADS=") and field[12:].isdigit():
            return int(field[12:])
    return INT_MAX   # an OpenBLAS that does not say: the C int is the only bound


def set_num_threads(n):
    """Set the number of threads of ckpt's OpenBLAS, 1 <= n <= max_num_threads(), which also
    bounds ckpt's pool. Called while a batch-split job runs (in another thread), the new count
    takes effect when the job ends.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"the number of threads must be an integer, got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"the number of threads must be at least 1, got {n}")
    limit = max_num_threads()
    if n > limit:
        raise ValueError(f"the number of threads must be at most {limit} (this OpenBLAS's "
                         f"MAX_THREADS; more than the cores is allowed up to there), got {n}")
    if not ckpt_pool_defer_blas(<int>n):
        scipy_openblas_set_num_threads(n)


def pool_workers():
    """Worker threads ckpt's pool has started in this process (0 in a fresh fork)."""
    return ckpt_pool_workers()


# --------------------------------------------------------------------------------------------
# Instruction-set variants of the elementwise kernels (runtime CPU dispatch: see _simd.h)
# --------------------------------------------------------------------------------------------

SIMD_VARIANTS = tuple(ckpt_simd_name(v).decode("ascii") for v in range(SIMD_COUNT))


def simd_variant():
    """The instruction set ckpt's elementwise kernels run in: "baseline", "avx2" or "avx512".

    The best the CPU supports unless the environment variable CKPT_SIMD, read at import, asks
    for another. Every variant computes the same values.
    """
    return SIMD_VARIANTS[ckpt_simd_active()]


def _supported_simd():
    """The variants this CPU (and OS) can run, baseline first."""
    return tuple(name for v, name in enumerate(SIMD_VARIANTS) if ckpt_simd_supported(v))


def _set_simd(name):
    """Run the elementwise kernels in the variant `name` from now on (for tests and benchmarks;
    not while a step runs in another thread). ValueError if the CPU cannot run it."""
    if name not in SIMD_VARIANTS:
        raise ValueError(f"unknown SIMD variant {name!r}; the variants are "
                         f"{', '.join(SIMD_VARIANTS)}")
    if ckpt_simd_select(SIMD_VARIANTS.index(name)) != 0:
        raise ValueError(f"this CPU cannot run the {name} variant; it supports "
                         f"{', '.join(_supported_simd())}")


def _choose_simd(value):
    """The variant for the value of CKPT_SIMD (None when unset), and a warning or None.

    Unset, empty or "auto": the best the CPU supports. A variant the CPU cannot run: the best it
    can, with a warning (so that one setting can serve several machines). Any other value: a
    ValueError, since a typo would otherwise go unnoticed.
    """
    best = SIMD_VARIANTS[ckpt_simd_best()]
    name = (value or "").strip().lower()
    if name in ("", "auto"):
        return best, None
    if name not in SIMD_VARIANTS:
        raise ValueError(f"CKPT_SIMD={value!r} is not a SIMD variant: use one of "
                         f"{', '.join(SIMD_VARIANTS)}, or auto (the same as unset: the best "
                         f"the CPU supports)")
    if name not in _supported_simd():
        return best, (f"CKPT_SIMD={name}: this CPU cannot run {name}; ckpt's elementwise "
                      f"kernels run in {best}, the best it supports")
    return name, None


def _apply_simd_environment():
    name, warning = _choose_simd(os.environ.get("CKPT_SIMD"))
    if warning is not None:
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    _set_simd(name)


_apply_simd_environment()


# --------------------------------------------------------------------------------------------
# Atomic byte counters (the state of MemoryUsageTracker)
# --------------------------------------------------------------------------------------------

cdef class AtomicCounters:
    """Lock-free byte counters: stored activations, recomputed, gradients and their exact peak.

    The methods here trust their arguments; ckpt.MemoryUsageTracker validates them.
    """

    def __cinit__(self):
        ckpt_reset(&self.c)

    def _record_stored(self, int64_t nbytes):
        ckpt_record_stored(&self.c, nbytes)

    def _release_stored(self, int64_t nbytes):
        return ckpt_release_stored(&self.c, nbytes)

    def _record_gradient(self, int64_t nbytes):
        ckpt_record_gradient(&self.c, nbytes)

    def _release_gradient(self, int64_t nbytes):
        return ckpt_release_gradient(&self.c, nbytes)

    def _record_recomputed(self, int64_t nbytes):
        ckpt_record_recomputed(&self.c, nbytes)

    def _reset(self):
        ckpt_reset(&self.c)

    def _restore(self, int64_t stored, int64_t recomputed, int64_t gradient, int64_t peak):
        """Set the four figures (for unpickling); the peak is at least what is held.

        Not atomic as a whole: call it only on counters no other thread is using.
        """
        ckpt_reset(&self.c)
        ckpt_record_stored(&self.c, stored)
        ckpt_record_gradient(&self.c, gradient)
        ckpt_record_recomputed(&self.c, recomputed)
        ckpt_raise_peak(&self.c, peak)

    @property
    def stored_activation_bytes(self):
        """Bytes of activations held now."""
        return ckpt_load(&self.c.stored)

    @property
    def recomputed_bytes(self):
        """Bytes of activations recomputed so far (cumulative)."""
        return ckpt_load(&self.c.recomputed)

    @property
    def gradient_bytes(self):
        """Bytes of gradient buffers held now."""
        return ckpt_load(&self.c.gradient)

    @property
    def peak_bytes(self):
        """Exact maximum ever held of stored activations plus gradients."""
        return ckpt_load(&self.c.peak)


def hammer_counters(AtomicCounters counters, Py_ssize_t iterations, int64_t nbytes):
    """Record then release `nbytes` of activations and gradients `iterations` times, GIL released.

    Exists for the tests: several threads running it at once exercise the counters from nogil code.
    """
    cdef Py_ssize_t i
    cdef ckpt_counters *c = &counters.c
    with nogil:
        for i in range(iterations):
            ckpt_record_stored(c, nbytes)
            ckpt_record_gradient(c, nbytes)
            ckpt_record_recomputed(c, nbytes)
            ckpt_release_gradient(c, nbytes)
            ckpt_release_stored(c, nbytes)


# The chain executor, then the element kinds it runs: each kind's kernels (forward and backward
# side by side) and its executor functions in a file of its own, registered in the executor's
# kind table as it is included. A new kind is one more line here.
include "_executor.pxi"
include "_dense.pxi"
include "_layernorm.pxi"
include "_dropout.pxi"
include "_residual.pxi"


# Loss and optimizer kernels live in their own file, compiled into this module.
include "_train_kernels.pxi"
