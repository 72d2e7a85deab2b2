# Fused loss and optimizer kernels (included into _core.pyx).
#
# Same two layers as the Dense kernels: a `noexcept nogil` function on raw pointers, and a
# wrapper on typed memoryviews that checks sizes with the GIL held. Every kernel makes one pass
# over its data; the pure-NumPy twins are in ckpt._reference_train. The optimizers' loops are in
# _simd_kernels.h (run in the variant _simd.h chose for this CPU); the losses stay here: their
# time goes to libm's exp and log, the same in every variant.

from libc.math cimport exp, log, sqrt


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

cdef Py_ssize_t softmax_cross_entropy_ptr(const floating *logits, const int64_t *labels,
                                          floating *grad, Py_ssize_t m, Py_ssize_t c,
                                          double *loss) noexcept nogil:
    """loss = mean(logsumexp(z) - z[label]); grad = (softmax(z) - onehot(label)) / m.

    Returns -1, or the first row whose label is outside [0, c) (nothing is written past it).
    """
    cdef Py_ssize_t i, j
    cdef int64_t label
    cdef const floating *z
    cdef floating *g
    cdef double zmax, total, inv_total, scale = 1.0 / m, acc = 0.0
    for i in range(m):
        label = labels[i]
        if label < 0 or label >= c:
            return i
        z = logits + i * c
        g = grad + i * c
        zmax = z[0]
        for j in range(1, c):
            if z[j] > zmax:
                zmax = z[j]
        total = 0.0
        for j in range(c):
            total += exp(z[j] - zmax)
        inv_total = scale / total
        for j in range(c):
            g[j] = <floating>(exp(z[j] - zmax) * inv_total)
        g[label] -= <floating>scale
        acc += log(total) + zmax - z[label]
    loss[0] = acc * scale
    return -1


cdef double mse_ptr(const floating *pred, const floating *target, floating *grad,
                    Py_ssize_t n) noexcept nogil:
    """loss = mean((pred - target)^2) over all n values; grad = 2 (pred - target) / n."""
    cdef Py_ssize_t i
    cdef double diff, acc = 0.0, scale = 2.0 / n
    for i in range(n):
        diff = <double>pred[i] - <double>target[i]
        acc += diff * diff
        grad[i] = <floating>(scale * diff)
    return acc / n


def softmax_cross_entropy_kernel(const floating[:, ::1] logits, const int64_t[::1] labels,
                                 floating[:, ::1] grad):
    """Mean cross-entropy of softmax(logits) against integer labels; its gradient goes to grad."""
    cdef Py_ssize_t m = logits.shape[0], c = logits.shape[1], bad
    cdef double loss = 0.0
    if labels.shape[0] != m:
        raise ValueError(f"{m} rows of logits but {labels.shape[0]} labels")
    if grad.shape[0] != m or grad.shape[1] != c:
        raise ValueError(f"grad has shape ({grad.shape[0]}, {grad.shape[1]}), expected ({m}, {c})")
    if c == 0:
        raise ValueError("logits need at least one class column")
    if m == 0:
        return 0.0
    with nogil:
        bad = softmax_cross_entropy_ptr(&logits[0, 0], &labels[0], &grad[0, 0], m, c, &loss)
    if bad >= 0:
        raise ValueError(f"label {labels[bad]} of row {bad} is outside the {c} classes [0, {c})")
    return loss


def mse_kernel(const floating[::1] pred, const floating[::1] target, floating[::1] grad):
    """Mean squared error over all values of pred; its gradient goes to grad."""
    cdef Py_ssize_t n = pred.shape[0]
    cdef double loss
    if target.shape[0] != n or grad.shape[0] != n:
        raise ValueError(f"pred has {n} values, target {target.shape[0]}, grad {grad.shape[0]}")
    if n == 0:
        return 0.0
    with nogil:
        loss = mse_ptr(&pred[0], &target[0], &grad[0], n)
    return loss


# --------------------------------------------------------------------------------------------
# Optimizers (PyTorch's update rules, one pass over each parameter)
# --------------------------------------------------------------------------------------------

cdef void sgd_momentum_step_ptr(floating *p, const floating *g, floating *buf, Py_ssize_t n,
                                floating lr, floating momentum, floating weight_decay,
                                bint nesterov) noexcept nogil:
    """d = g + wd p; buf = mu buf + d; p -= lr (d + mu buf if nesterov else buf).

    buf starts at zero, which makes the first step buf = d as in PyTorch; buf may be NULL when
    momentum is zero.
    """
    if floating is float:
        ckpt_simd_kernels().sgd_momentum_step_f(p, g, buf, n, lr, momentum, weight_decay,
                                                nesterov)
    else:
        ckpt_simd_kernels().sgd_momentum_step_d(p, g, buf, n, lr, momentum, weight_decay,
                                                nesterov)


cdef void adam_step_ptr(floating *p, const floating *g, floating *m, floating *v, Py_ssize_t n,
                        floating step_size, floating beta1, floating beta2, floating eps,
                        floating inv_sqrt_bc2, floating weight_decay,
                        floating decay_factor) noexcept nogil:
    """d = g + wd p; m = b1 m + (1-b1) d; v = b2 v + (1-b2) d^2; p = f p - s m / (sqrt(v/bc2) + eps).

    s = lr / bc1 carries the first bias correction; f = 1 - lr wd is AdamW's decoupled decay
    (then wd = 0), and f = 1 for Adam.
    """
    if floating is float:
        ckpt_simd_kernels().adam_step_f(p, g, m, v, n, step_size, beta1, beta2, eps, inv_sqrt_bc2,
                                        weight_decay, decay_factor)
    else:
        ckpt_simd_kernels().adam_step_d(p, g, m, v, n, step_size, beta1, beta2, eps, inv_sqrt_bc2,
                                        weight_decay, decay_factor)


def sgd_momentum_step(floating[::1] p, const floating[::1] g, floating[::1] buf, double lr,
                      double momentum, double weight_decay, bint nesterov):
    """PyTorch's SGD step on one parameter, in place; buf=None for no momentum."""
    cdef Py_ssize_t n = p.shape[0]
    cdef floating *buf_ptr = NULL
    if g.shape[0] != n:
        raise ValueError(f"parameter has {n} values but its gradient has {g.shape[0]}")
    if buf is not None:
        if buf.shape[0] != n:
            raise ValueError(f"parameter has {n} values but its momentum buffer has {buf.shape[0]}")
        if n:
            buf_ptr = &buf[0]
    if n == 0:
        return
    with nogil:
        sgd_momentum_step_ptr(&p[0], &g[0], buf_ptr, n, <floating>lr, <floating>momentum,
                              <floating>weight_decay, nesterov)


def adam_step(floating[::1] p, const floating[::1] g, floating[::1] m, floating[::1] v,
              double lr, double beta1, double beta2, double eps, double weight_decay,
              bint decoupled, Py_ssize_t step):
    """Adam (or AdamW with decoupled=True) step number `step` (from 1) on one parameter."""
    cdef Py_ssize_t n = p.shape[0]
    cdef double bc1, bc2, wd = weight_decay, factor = 1.0
    if g.shape[0] != n or m.shape[0] != n or v.shape[0] != n:
        raise ValueError(f"parameter has {n} values but its gradient has {g.shape[0]} "
                         f"and its moments {m.shape[0]} and {v.shape[0]}")
    if step < 1:
        raise ValueError(f"the step count starts at 1, got {step}")
    if n == 0:
        return
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    if decoupled:
        factor = 1.0 - lr * weight_decay
        wd = 0.0
    with nogil:
        adam_step_ptr(&p[0], &g[0], &m[0], &v[0], n, <floating>(lr / bc1), <floating>beta1,
                      <floating>beta2, <floating>eps, <floating>(1.0 / sqrt(bc2)),
                      <floating>wd, <floating>factor)


# --------------------------------------------------------------------------------------------
# Output units with their losses, as scikit-learn's MLPs define them (ckpt.estimators)
# --------------------------------------------------------------------------------------------

cdef enum:
    OUT_IDENTITY = 0   # linear outputs, half squared error
    OUT_LOGISTIC = 1   # one sigmoid unit per output, binary cross-entropy (binary, multilabel)
    OUT_SOFTMAX = 2    # softmax over the outputs, categorical cross-entropy (multiclass)

OUTPUT_CODES = {"identity": OUT_IDENTITY, "logistic": OUT_LOGISTIC, "softmax": OUT_SOFTMAX}


cdef inline double _xlogy(double a, double b) noexcept nogil:
    """a log b, and 0 when a is 0 (as scipy.special.xlogy)"""
    return 0.0 if a == 0 else a * log(b)


cdef inline double _clip(double p, double eps) noexcept nogil:
    return eps if p < eps else (1 - eps if p > 1 - eps else p)


cdef double output_loss_ptr(const floating *z, const floating *y, const floating *w,
                            floating *grad, Py_ssize_t m, Py_ssize_t c, int out, double sw_sum,
                            double eps) noexcept nogil:
    """p = out(z); grad = w_i (p - y) / sw_sum; returns the loss, one pass per row:

    identity: 0.5 sum_i w_i mean_j (p - y)^2 / sw_sum
    logistic: -sum_i w_i sum_j [y log p + (1 - y) log(1 - p)] / sw_sum
    softmax:  -sum_i w_i sum_j y log p / sw_sum
    with p clipped to [eps, 1 - eps] inside the logarithms only. w NULL weighs every row 1.
    """
    cdef Py_ssize_t i, j
    cdef double wi, scale, acc = 0.0, row, d, p, zj, zmax, total
    cdef const floating *zr
    cdef const floating *yr
    cdef floating *gr
    for i in range(m):
        wi = 1.0 if w == NULL else w[i]
        scale = wi / sw_sum
        zr = z + i * c
        yr = y + i * c
        gr = grad + i * c
        row = 0.0
        if out == OUT_IDENTITY:
            for j in range(c):
                d = <double>zr[j] - <double>yr[j]
                row += d * d
                gr[j] = <floating>(scale * d)
            row = 0.5 * row / c
        elif out == OUT_LOGISTIC:
            for j in range(c):
                zj = zr[j]
                if zj >= 0:          # two branches so exp never overflows
                    p = 1.0 / (1.0 + exp(-zj))
                else:
                    p = exp(zj)
                    p = p / (1.0 + p)
                gr[j] = <floating>(scale * (p - yr[j]))
                p = _clip(p, eps)
                row -= _xlogy(yr[j], p) + _xlogy(1.0 - yr[j], 1.0 - p)
        else:
            zmax = zr[0]
            for j in range(1, c):
                if zr[j] > zmax:
                    zmax = zr[j]
            total = 0.0
            for j in range(c):
                total += exp(zr[j] - zmax)
            for j in range(c):
                p = exp(zr[j] - zmax) / total
                gr[j] = <floating>(scale * (p - yr[j]))
                row -= _xlogy(yr[j], _clip(p, eps))
        acc += wi * row
    return acc / sw_sum


def output_loss_kernel(const floating[:, ::1] z, const floating[:, ::1] y,
                       const floating[::1] sample_weight, floating[:, ::1] grad, int output):
    """scikit-learn's MLP loss of the network output z (before the output units) against y.

    Returns the loss (weighted by sample_weight, None for all ones, and divided by its sum);
    grad receives its gradient with respect to z, w_i (out(z) - y) / sum(w), which is what
    scikit-learn back-propagates (for the identity output, the gradient of the loss before its
    mean over the outputs). The clip eps is the dtype's machine epsilon, as in scikit-learn.
    """
    cdef Py_ssize_t m = z.shape[0], c = z.shape[1], i
    cdef double sw_sum = 0.0, eps
    cdef const floating *w_ptr = NULL
    cdef double loss
    if y.shape[0] != m or y.shape[1] != c:
        raise ValueError(f"y has shape ({y.shape[0]}, {y.shape[1]}), expected ({m}, {c}) like z")
    if grad.shape[0] != m or grad.shape[1] != c:
        raise ValueError(f"grad has shape ({grad.shape[0]}, {grad.shape[1]}), expected ({m}, {c})")
    if output < OUT_IDENTITY or output > OUT_SOFTMAX:
        raise ValueError(f"unknown output code {output}; see OUTPUT_CODES")
    if c == 0:
        raise ValueError("z needs at least one output column")
    if sample_weight is not None and sample_weight.shape[0] != m:
        raise ValueError(f"{m} rows but {sample_weight.shape[0]} sample weights")
    if m == 0:
        return 0.0
    if sample_weight is None:
        sw_sum = m
    else:
        for i in range(m):
            if not sample_weight[i] >= 0:
                raise ValueError(f"sample weight {sample_weight[i]} of row {i} is not a "
                                 f"non-negative number")
            sw_sum += sample_weight[i]
        if sw_sum <= 0:
            raise ValueError("the sample weights of the batch sum to 0")
        w_ptr = &sample_weight[0]
    eps = 1.1920928955078125e-07 if floating is float else 2.220446049250313e-16
    with nogil:
        loss = output_loss_ptr(&z[0, 0], &y[0, 0], w_ptr, &grad[0, 0], m, c, output, sw_sum, eps)
    return loss
