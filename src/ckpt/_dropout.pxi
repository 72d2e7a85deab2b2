# The Dropout kind (included into _core.pyx after the executor): inverted dropout, kept values
# scaled by 1 / (1 - p). The mask is recomputed, never stored: a pure function of (the step's
# seed, the element's stream, the global row, the column), from ckpt/_rng.h. Its kernel, its
# memoryview wrapper, and its executor functions, registered in the executor's kind table. The
# NumPy twin is ckpt.elements.dropout.

from libc.stdint cimport uint64_t
from libc.string cimport memcpy

cdef extern from "_rng.h" nogil:
    uint64_t ckpt_dropout_key(uint64_t seed, uint64_t stream)


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


# The executor's functions: the identity outside training or with p = 0.

cdef void _dropout_element_forward(const Element *table, const Element *e, Step *s,
                                   const floating *x, floating *y, floating *scratch,
                                   floating *tape) noexcept nogil:
    if s.training and e.p > 0:
        dropout_ptr(x, y, s.m, e.n_in, ckpt_dropout_key(s.seed, e.stream), s.row0,
                    e.threshold, <floating>(1.0 / (1.0 - e.p)))
    elif s.m:
        memcpy(y, x, s.m * e.n_in * sizeof(floating))


cdef void _dropout_element_backward(const Element *table, const Element *e, Step *s,
                                    const floating *x, const floating *y, floating *d,
                                    const floating *g, floating *gx, floating *scratch,
                                    floating *tape) noexcept nogil:
    if gx == NULL:
        return
    if s.training and e.p > 0:
        dropout_ptr(g, gx, s.m, e.n_in, ckpt_dropout_key(s.seed, e.stream), s.row0,
                    e.threshold, <floating>(1.0 / (1.0 - e.p)))
    elif s.m:
        memcpy(gx, g, s.m * e.n_in * sizeof(floating))


cdef int _dropout_check(const Element *table, const Element *e, Py_ssize_t index,
                        const Py_ssize_t *sizes, Py_ssize_t n_params) except -1:
    if e.n_in != e.n_out:
        raise ValueError(f"element {index}: a width-preserving element maps {e.n_in} to "
                         f"{e.n_out} features")
    _check_dropout(e.p)
    return 0


cdef KindOps _dropout_ops
_dropout_ops.forward_f = _dropout_element_forward[float]
_dropout_ops.forward_d = _dropout_element_forward[double]
_dropout_ops.backward_f = _dropout_element_backward[float]
_dropout_ops.backward_d = _dropout_element_backward[double]
_dropout_ops.check = _dropout_check
_dropout_ops.has_body = False
_dropout_ops.is_gemm = False
_register_kind("dropout", _dropout_ops)
