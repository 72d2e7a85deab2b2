# LayerNorm and Dropout kernels (included into _core.pyx), in the two layers of the Dense ones:
# `noexcept nogil` functions on raw pointers, and memoryview wrappers that validate first.
# Their NumPy twins are ckpt._reference.layernorm_* and ckpt._reference.dropout_*. The loops are
# in _simd_kernels.h, run in the variant _simd.h chose for this CPU.

from libc.stdint cimport uint64_t
from libc.string cimport memcpy

cdef extern from "_rng.h" nogil:
    uint64_t ckpt_dropout_key(uint64_t seed, uint64_t stream)


# --------------------------------------------------------------------------------------------
# LayerNorm (as PyTorch: biased variance, eps inside the square root)
# --------------------------------------------------------------------------------------------

cdef void layernorm_forward_ptr(const floating *x, const floating *gamma, const floating *beta,
                                floating *y, Py_ssize_t m, Py_ssize_t n,
                                double eps) noexcept nogil:
    """y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta, row by row; the statistics in
    double, the sums in 8 interleaved accumulators added pairwise (a fixed order)."""
    if floating is float:
        ckpt_simd_kernels().layernorm_forward_f(x, gamma, beta, y, m, n, eps)
    else:
        ckpt_simd_kernels().layernorm_forward_d(x, gamma, beta, y, m, n, eps)


cdef void layernorm_backward_ptr(const floating *x, const floating *gamma, const floating *g,
                                 floating *gx, floating *ggamma, floating *gbeta, Py_ssize_t m,
                                 Py_ssize_t n, double eps, bint overwrite=False) noexcept nogil:
    """ggamma += sum(g * xhat); gbeta += sum(g); gx = rstd (g*gamma - mean(g*gamma)
    - xhat mean(g*gamma*xhat)) (skipped if gx is NULL). The statistics are recomputed from x.
    With overwrite, ggamma and gbeta are set (=) instead (zeroed, then the sums added)."""
    if overwrite:
        memset(ggamma, 0, n * sizeof(floating))
        memset(gbeta, 0, n * sizeof(floating))
    if floating is float:
        ckpt_simd_kernels().layernorm_backward_f(x, gamma, g, gx, ggamma, gbeta, m, n, eps)
    else:
        ckpt_simd_kernels().layernorm_backward_d(x, gamma, g, gx, ggamma, gbeta, m, n, eps)


# --------------------------------------------------------------------------------------------
# Dropout (inverted: kept values scaled by 1 / (1 - p)); the mask is recomputed, never stored
# --------------------------------------------------------------------------------------------

cdef void dropout_ptr(const floating *src, floating *dst, Py_ssize_t m, Py_ssize_t n,
                      uint64_t key, int64_t row0, uint64_t threshold,
                      floating scale) noexcept nogil:
    """dst = src * mask * scale; mask[r, c] = bits(key, row0 + r, c) >= threshold.

    A product, not a select, so NaN in a dropped value stays NaN (as in PyTorch). The same
    function applies the mask to the gradient in backward.
    """
    if floating is float:
        ckpt_simd_kernels().dropout_f(src, dst, m, n, key, row0, threshold, scale)
    else:
        ckpt_simd_kernels().dropout_d(src, dst, m, n, key, row0, threshold, scale)


cdef inline uint64_t dropout_threshold(double p) noexcept nogil:
    """floor(p * 2^32): a value is kept iff its 32 random bits are at least this."""
    return <uint64_t>(p * 4294967296.0)


cdef int _check_dropout(double p) except -1:
    if not 0 <= p < 1:
        raise ValueError(f"the dropout probability must be in [0, 1), got {p}")
    return 0


def layernorm_forward(const floating[:, ::1] x, const floating[::1] gamma,
                      const floating[::1] beta, floating[:, ::1] y, double eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta per row, written into y."""
    cdef Py_ssize_t m = x.shape[0], n = x.shape[1]
    if gamma.shape[0] != n or beta.shape[0] != n:
        raise ValueError(f"x has {n} features but gamma and beta have {gamma.shape[0]} and "
                         f"{beta.shape[0]}")
    if y.shape[0] != m or y.shape[1] != n:
        raise ValueError(f"y has shape ({y.shape[0]}, {y.shape[1]}), expected ({m}, {n})")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if m == 0 or n == 0:
        return
    with nogil:
        layernorm_forward_ptr(&x[0, 0], &gamma[0], &beta[0], &y[0, 0], m, n, eps)


def layernorm_backward(const floating[:, ::1] x, const floating[::1] gamma,
                       const floating[:, ::1] g, floating[:, ::1] gx, floating[::1] ggamma,
                       floating[::1] gbeta, double eps=1e-5):
    """ggamma += sum(g * xhat), gbeta += sum(g), gx = input gradient (gx=None skips it)."""
    cdef Py_ssize_t m = x.shape[0], n = x.shape[1]
    cdef floating *gx_ptr = NULL
    if gamma.shape[0] != n or ggamma.shape[0] != n or gbeta.shape[0] != n:
        raise ValueError(f"x has {n} features but gamma, grad_gamma and grad_beta have "
                         f"{gamma.shape[0]}, {ggamma.shape[0]} and {gbeta.shape[0]}")
    if g.shape[0] != m or g.shape[1] != n:
        raise ValueError(f"grad_output has shape ({g.shape[0]}, {g.shape[1]}), expected ({m}, {n})")
    if gx is not None and (gx.shape[0] != m or gx.shape[1] != n):
        raise ValueError(f"grad_input has shape ({gx.shape[0]}, {gx.shape[1]}), expected ({m}, {n})")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if m == 0 or n == 0:
        return
    if gx is not None:
        gx_ptr = &gx[0, 0]
    with nogil:
        layernorm_backward_ptr(&x[0, 0], &gamma[0], &g[0, 0], gx_ptr, &ggamma[0], &gbeta[0],
                               m, n, eps)


def dropout_apply(const floating[:, ::1] src, floating[:, ::1] dst, double p, uint64_t seed,
                  uint64_t stream=0, int64_t row0=0):
    """dst = src * mask / (1 - p), the mask keyed by (seed, stream, row0 + row, column)."""
    cdef Py_ssize_t m = src.shape[0], n = src.shape[1]
    _check_dropout(p)
    if dst.shape[0] != m or dst.shape[1] != n:
        raise ValueError(f"dst has shape ({dst.shape[0]}, {dst.shape[1]}), expected ({m}, {n})")
    if row0 < 0:
        raise ValueError(f"row0 must be non-negative, got {row0}")
    if m == 0 or n == 0:
        return
    with nogil:
        dropout_ptr(&src[0, 0], &dst[0, 0], m, n, ckpt_dropout_key(seed, stream), row0,
                    dropout_threshold(p), <floating>(1.0 / (1.0 - p)))
