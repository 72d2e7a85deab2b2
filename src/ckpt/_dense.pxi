# The Dense kind (included into _core.pyx after the executor): y = act(x @ W + b). Its kernels
# in the two layers of scikit-learn's _cython_blas -- `noexcept nogil` functions on raw pointers,
# and memoryview wrappers that validate first -- and its executor functions, registered in the
# executor's kind table. The NumPy twin is ckpt.elements.dense (dense_forward, dense_backward).

cdef inline void _gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, Py_ssize_t m, Py_ssize_t n,
                       Py_ssize_t k, const floating *a, Py_ssize_t lda, const floating *b,
                       Py_ssize_t ldb, floating beta, floating *c, Py_ssize_t ldc) noexcept nogil:
    """c = a @ b + beta * c (row-major, a and b optionally transposed)"""
    if floating is float:
        scipy_cblas_sgemm(CblasRowMajor, ta, tb, <int>m, <int>n, <int>k, 1.0, a, <int>lda,
                          b, <int>ldb, beta, c, <int>ldc)
    else:
        scipy_cblas_dgemm(CblasRowMajor, ta, tb, <int>m, <int>n, <int>k, 1.0, a, <int>lda,
                          b, <int>ldb, beta, c, <int>ldc)


cdef void _bias_activate(floating *y, const floating *b, Py_ssize_t m, Py_ssize_t n, int act,
                         floating alpha) noexcept nogil:
    """y = act(y + b), one pass."""
    if floating is float:
        ckpt_simd_kernels().bias_activate_f(y, b, m, n, act, alpha)
    else:
        ckpt_simd_kernels().bias_activate_d(y, b, m, n, act, alpha)


cdef void dense_forward_ptr(const floating *x, const floating *w, const floating *b, floating *y,
                            Py_ssize_t m, Py_ssize_t k, Py_ssize_t n, int act,
                            floating alpha) noexcept nogil:
    """y = act(x @ W + b); bias and activation fused into one pass over y."""
    if m == 0:
        return
    _gemm(CblasNoTrans, CblasNoTrans, m, n, k, x, k, w, n, <floating>0, y, n)
    _bias_activate(y, b, m, n, act, alpha)


cdef void dense_preactivation_ptr(const floating *x, const floating *w, const floating *b,
                                  floating *z, Py_ssize_t m, Py_ssize_t k,
                                  Py_ssize_t n) noexcept nogil:
    """z = x @ W + b"""
    dense_forward_ptr(x, w, b, z, m, k, n, ACT_IDENTITY, <floating>0)


cdef void _delta(const floating *g, const floating *v, floating *d, Py_ssize_t size, int act,
                 floating alpha) noexcept nogil:
    """d = g * act'(v), elementwise; d may alias g or v."""
    if floating is float:
        ckpt_simd_kernels().delta_f(g, v, d, size, act, alpha)
    else:
        ckpt_simd_kernels().delta_d(g, v, d, size, act, alpha)


cdef void _column_sums(const floating *d, floating *gb, Py_ssize_t m,
                       Py_ssize_t n) noexcept nogil:
    """gb += d.sum(axis=0), row after row."""
    if floating is float:
        ckpt_simd_kernels().column_sums_f(d, gb, m, n)
    else:
        ckpt_simd_kernels().column_sums_d(d, gb, m, n)


cdef void dense_backward_ptr(const floating *x, const floating *w, const floating *g,
                             const floating *v, floating *d, floating *gw, floating *gb,
                             floating *gx, Py_ssize_t m, Py_ssize_t k, Py_ssize_t n, int act,
                             floating alpha, bint overwrite=False) noexcept nogil:
    """d = g * act'(v); gb += colsum(d); gW += x.T @ d; gx = d @ W.T (skipped if gx is NULL).
    With overwrite, gb and gW are set (=) instead: the GEMM's beta is 0, so the old gradient is
    never read -- the same values as zeroing first, without the pass.

    v is the layer's output y (its pre-activation z for GELU). d may alias v or g. For the
    identity d = g: neither v nor d is touched and both may be NULL.
    """
    cdef const floating *delta = g
    if overwrite:
        memset(gb, 0, n * sizeof(floating))
        if m == 0:
            memset(gw, 0, k * n * sizeof(floating))
    if m == 0:
        return
    if act != ACT_IDENTITY:
        _delta(g, v, d, m * n, act, alpha)
        delta = d
    _column_sums(delta, gb, m, n)
    _gemm(CblasTrans, CblasNoTrans, k, n, m, x, k, delta, n, <floating>(0 if overwrite else 1),
          gw, n)
    if gx != NULL:
        _gemm(CblasNoTrans, CblasTrans, m, k, n, delta, n, w, n, <floating>0, gx, k)


# Memoryview wrappers (validate with the GIL, compute without it)

def dense_forward(const floating[:, ::1] x, const floating[:, ::1] w, const floating[::1] b,
                  floating[:, ::1] y, int act=ACT_IDENTITY, double alpha=0.01):
    """y = act(x @ W + b), written into y."""
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], n = w.shape[1]
    if w.shape[0] != k:
        raise ValueError(f"x has {k} features but W has {w.shape[0]} rows")
    if b.shape[0] != n:
        raise ValueError(f"b has {b.shape[0]} entries, expected {n} (W's columns)")
    if y.shape[0] != m or y.shape[1] != n:
        raise ValueError(f"y has shape ({y.shape[0]}, {y.shape[1]}), expected ({m}, {n})")
    _check_act(act, alpha)
    _check_blas_dim(m, "batch size")
    _check_blas_dim(k, "in_features")
    _check_blas_dim(n, "out_features")
    if m == 0:
        return
    with nogil:
        dense_forward_ptr(&x[0, 0], &w[0, 0], &b[0], &y[0, 0], m, k, n, act, <floating>alpha)


def dense_backward(const floating[:, ::1] x, const floating[:, ::1] w, const floating[:, ::1] g,
                   const floating[:, ::1] v, floating[:, ::1] d, floating[:, ::1] gw,
                   floating[::1] gb, floating[:, ::1] gx, int act=ACT_IDENTITY,
                   double alpha=0.01):
    """d = g * act'(v); gb += colsum(d); gW += x.T @ d; gx = d @ W.T.

    v holds the forward output (the pre-activation for GELU); d receives the delta and may be the
    same array as v. Both may be None for the identity. gx=None skips the input gradient.
    """
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1], n = w.shape[1]
    cdef const floating *v_ptr = NULL
    cdef floating *d_ptr = NULL
    cdef floating *gx_ptr = NULL
    if w.shape[0] != k:
        raise ValueError(f"x has {k} features but W has {w.shape[0]} rows")
    if g.shape[0] != m or g.shape[1] != n:
        raise ValueError(f"grad_output has shape ({g.shape[0]}, {g.shape[1]}), expected ({m}, {n})")
    if gw.shape[0] != k or gw.shape[1] != n:
        raise ValueError(f"grad_W has shape ({gw.shape[0]}, {gw.shape[1]}), expected ({k}, {n})")
    if gb.shape[0] != n:
        raise ValueError(f"grad_b has {gb.shape[0]} entries, expected {n}")
    _check_act(act, alpha)
    if act != ACT_IDENTITY:
        if v is None or v.shape[0] != m or v.shape[1] != n:
            raise ValueError(f"the activation values must have shape ({m}, {n})")
        if d is None or d.shape[0] != m or d.shape[1] != n:
            raise ValueError(f"the delta buffer must have shape ({m}, {n})")
    if gx is not None and (gx.shape[0] != m or gx.shape[1] != k):
        raise ValueError(f"grad_input has shape ({gx.shape[0]}, {gx.shape[1]}), expected ({m}, {k})")
    _check_blas_dim(m, "batch size")
    _check_blas_dim(k, "in_features")
    _check_blas_dim(n, "out_features")
    if m == 0:
        return
    if act != ACT_IDENTITY:
        v_ptr = &v[0, 0]
        d_ptr = &d[0, 0]
    if gx is not None:
        gx_ptr = &gx[0, 0]
    with nogil:
        dense_backward_ptr(&x[0, 0], &w[0, 0], &g[0, 0], v_ptr, d_ptr, &gw[0, 0], &gb[0], gx_ptr,
                           m, k, n, act, <floating>alpha)


# The executor's functions: the element's parameters are W and b at e.param, e.param + 1.

cdef void _dense_element_forward(const Element *table, const Element *e, Step *s,
                                 const floating *x, floating *y, floating *scratch,
                                 floating *tape) noexcept nogil:
    dense_forward_ptr(x, <floating *>s.params[e.param], <floating *>s.params[e.param + 1],
                      y, s.m, e.n_in, e.n_out, e.act, <floating>e.alpha)


cdef void _dense_element_backward(const Element *table, const Element *e, Step *s,
                                  const floating *x, const floating *y, floating *d,
                                  const floating *g, floating *gx, floating *scratch,
                                  floating *tape) noexcept nogil:
    cdef const floating *v = y
    if e.needs_preact:     # its derivative needs the pre-activation: recompute it in d
        dense_preactivation_ptr(x, <floating *>s.params[e.param],
                                <floating *>s.params[e.param + 1], d, s.m, e.n_in, e.n_out)
        v = d
    dense_backward_ptr(x, <floating *>s.params[e.param], g, v, d,
                       <floating *>s.grads[e.param], <floating *>s.grads[e.param + 1], gx,
                       s.m, e.n_in, e.n_out, e.act, <floating>e.alpha, s.overwrite)


cdef int _dense_check(const Element *table, const Element *e, Py_ssize_t index,
                      const Py_ssize_t *sizes, Py_ssize_t n_params) except -1:
    _check_act(e.act, e.alpha)
    _check_param_size(e, 0, e.n_in * e.n_out, index, sizes, n_params)
    _check_param_size(e, 1, e.n_out, index, sizes, n_params)
    return 0


cdef KindOps _dense_ops
_dense_ops.forward_f = _dense_element_forward[float]
_dense_ops.forward_d = _dense_element_forward[double]
_dense_ops.backward_f = _dense_element_backward[float]
_dense_ops.backward_d = _dense_element_backward[double]
_dense_ops.check = _dense_check
_dense_ops.has_body = False
_dense_ops.is_gemm = True
_register_kind("dense", _dense_ops)
