# The LayerNorm kind (included into _core.pyx after the executor): as PyTorch's nn.LayerNorm,
# biased variance, eps inside the square root. Its raw-pointer kernels, their memoryview
# wrappers, and its executor functions, registered in the executor's kind table. The loops are
# in _simd_kernels.h; the NumPy twin is ckpt.elements.layernorm.


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


# The executor's functions: the element's parameters are gamma and beta at e.param, e.param + 1.

cdef void _layernorm_element_forward(const Element *table, const Element *e, Step *s,
                                     const floating *x, floating *y, floating *scratch,
                                     floating *tape) noexcept nogil:
    layernorm_forward_ptr(x, <floating *>s.params[e.param], <floating *>s.params[e.param + 1],
                          y, s.m, e.n_in, e.eps)


cdef void _layernorm_element_backward(const Element *table, const Element *e, Step *s,
                                      const floating *x, const floating *y, floating *d,
                                      const floating *g, floating *gx, floating *scratch,
                                      floating *tape) noexcept nogil:
    layernorm_backward_ptr(x, <floating *>s.params[e.param], g, gx,
                           <floating *>s.grads[e.param], <floating *>s.grads[e.param + 1],
                           s.m, e.n_in, e.eps, s.overwrite)


cdef int _layernorm_check(const Element *table, const Element *e, Py_ssize_t index,
                          const Py_ssize_t *sizes, Py_ssize_t n_params) except -1:
    if e.n_in != e.n_out:
        raise ValueError(f"element {index}: a width-preserving element maps {e.n_in} to "
                         f"{e.n_out} features")
    if not e.eps > 0:
        raise ValueError(f"element {index}: eps must be positive, got {e.eps}")
    _check_param_size(e, 0, e.n_in, index, sizes, n_params)
    _check_param_size(e, 1, e.n_in, index, sizes, n_params)
    return 0


cdef KindOps _layernorm_ops
_layernorm_ops.forward_f = _layernorm_element_forward[float]
_layernorm_ops.forward_d = _layernorm_element_forward[double]
_layernorm_ops.backward_f = _layernorm_element_backward[float]
_layernorm_ops.backward_d = _layernorm_element_backward[double]
_layernorm_ops.check = _layernorm_check
_layernorm_ops.has_body = False
_layernorm_ops.is_gemm = False
_register_kind("layernorm", _layernorm_ops)
