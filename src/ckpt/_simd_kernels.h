/* ckpt's elementwise kernels for one floating type and one instruction-set variant.
 *
 * No include guard: _simd.h includes this file once per (variant, type), having defined
 *   CKPT_REAL       float or double
 *   CKPT_SQRT       sqrtf or sqrt
 *   CKPT_FN(name)   name with the type's and the variant's suffix (name_f_avx2, ...)
 * and, for the AVX variants, inside `#pragma GCC target(...)`, so that gcc's vectoriser compiles
 * the same loops for each instruction set.
 *
 * Every variant computes the same bits: each element's arithmetic is written out in one order,
 * the build turns floating-point contraction off (-ffp-contract=off, so no variant fuses a
 * multiply and an add), and without -ffast-math gcc never reorders a sum. The vector width only
 * changes how many elements a loop handles at once. The sums across elements (LayerNorm's row
 * statistics) run in CKPT_LANES accumulators, a fixed order whatever the variant. Transcendental
 * functions are libm's scalar ones in every variant.
 *
 * Literals such as 1.0 are doubles: in the float kernels the expressions they enter are computed
 * in double and rounded to float once, on assignment.
 *
 * The Cython wrappers (_core.pyx, _elements.pxi, _train_kernels.pxi) validate the arguments;
 * these functions trust them. The NumPy twins are in ckpt._reference and ckpt._reference_train. */

/* ---- activations, one element ---- */

/* y = act(z) */
static inline CKPT_REAL CKPT_FN(ckpt_activate)(CKPT_REAL z, int act, CKPT_REAL alpha) {
    double e;
    switch (act) {
    case CKPT_ACT_RELU:         /* `z <= 0` so that NaN propagates, as np.maximum does */
        return z <= 0 ? 0 : z;
    case CKPT_ACT_LEAKY_RELU:
        return z <= 0 ? alpha * z : z;
    case CKPT_ACT_TANH:
        return (CKPT_REAL)tanh(z);
    case CKPT_ACT_SIGMOID:      /* two branches so exp never overflows */
        if (z >= 0)
            return (CKPT_REAL)(1.0 / (1.0 + exp(-z)));
        e = exp(z);
        return (CKPT_REAL)(e / (1.0 + e));
    case CKPT_ACT_GELU:         /* exact: z Phi(z), PyTorch's approximate='none' */
        return (CKPT_REAL)(0.5 * z * (1.0 + erf(z * CKPT_SQRT1_2)));
    case CKPT_ACT_SOFTPLUS:     /* max(z, 0) + log1p(e^-|z|), stable for any z */
        return (CKPT_REAL)((z > 0 ? z : 0) + log1p(exp(-fabs(z))));
    case CKPT_ACT_SILU:         /* z sigmoid(z), the sigmoid's two branches */
        if (z >= 0)
            return (CKPT_REAL)(z / (1.0 + exp(-z)));
        e = exp(z);
        return (CKPT_REAL)(z * e / (1.0 + e));
    default:
        return z;
    }
}

/* act'(z), from v = act(z) (the output), or from v = z for the activations that need their
 * pre-activation (GELU, SiLU) */
static inline CKPT_REAL CKPT_FN(ckpt_derivative)(CKPT_REAL v, int act, CKPT_REAL alpha) {
    double s, e;
    switch (act) {
    case CKPT_ACT_RELU:
        return v > 0 ? 1 : 0;
    case CKPT_ACT_LEAKY_RELU:
        return v > 0 ? 1 : alpha;
    case CKPT_ACT_TANH:
        return (CKPT_REAL)(1.0 - v * v);
    case CKPT_ACT_SIGMOID:
        return (CKPT_REAL)(v * (1.0 - v));
    case CKPT_ACT_GELU:
        return (CKPT_REAL)(0.5 * (1.0 + erf(v * CKPT_SQRT1_2))
                           + v * CKPT_INV_SQRT_2PI * exp(-0.5 * v * v));
    case CKPT_ACT_SOFTPLUS:     /* sigmoid(z) = 1 - e^-y; expm1 keeps it accurate for tiny y */
        return (CKPT_REAL)(-expm1(-v));
    case CKPT_ACT_SILU:         /* s (1 + z (1 - s)), s = sigmoid(z) */
        if (v >= 0) {
            s = 1.0 / (1.0 + exp(-v));
        } else {
            e = exp(v);
            s = e / (1.0 + e);
        }
        return (CKPT_REAL)(s * (1.0 + v * (1.0 - s)));
    default:
        return 1;
    }
}

/* ---- Dense ---- */

/* y = act(y + b) for an m x n row-major y, one pass. The activation is chosen outside the
 * loops, so that the ReLU family compiles to branch-free vector loops. */
static void CKPT_FN(ckpt_bias_activate)(CKPT_REAL *y, const CKPT_REAL *b, ptrdiff_t m,
                                        ptrdiff_t n, int act, CKPT_REAL alpha) {
    ptrdiff_t i, j;
    CKPT_REAL z;
    for (i = 0; i < m; i++) {
        CKPT_REAL *row = y + i * n;
        switch (act) {
        case CKPT_ACT_IDENTITY:
            for (j = 0; j < n; j++)
                row[j] = row[j] + b[j];
            break;
        case CKPT_ACT_RELU:
            for (j = 0; j < n; j++) {
                z = row[j] + b[j];
                row[j] = z <= 0 ? 0 : z;
            }
            break;
        case CKPT_ACT_LEAKY_RELU:
            for (j = 0; j < n; j++) {
                z = row[j] + b[j];
                row[j] = z <= 0 ? alpha * z : z;
            }
            break;
        default:
            for (j = 0; j < n; j++)
                row[j] = CKPT_FN(ckpt_activate)(row[j] + b[j], act, alpha);
        }
    }
}

/* d = g * act'(v) over `size` values; d may be g or v. A true product: NaN in g stays NaN. */
static void CKPT_FN(ckpt_delta)(const CKPT_REAL *g, const CKPT_REAL *v, CKPT_REAL *d,
                                ptrdiff_t size, int act, CKPT_REAL alpha) {
    const CKPT_REAL one = 1, zero = 0;
    ptrdiff_t i;
    switch (act) {
    case CKPT_ACT_RELU:
        for (i = 0; i < size; i++)
            d[i] = g[i] * (v[i] > 0 ? one : zero);
        break;
    case CKPT_ACT_LEAKY_RELU:
        for (i = 0; i < size; i++)
            d[i] = g[i] * (v[i] > 0 ? one : alpha);
        break;
    case CKPT_ACT_TANH:
        for (i = 0; i < size; i++)
            d[i] = (CKPT_REAL)(g[i] * (1.0 - v[i] * v[i]));
        break;
    case CKPT_ACT_SIGMOID:
        for (i = 0; i < size; i++)
            d[i] = (CKPT_REAL)(g[i] * (v[i] * (1.0 - v[i])));
        break;
    default:
        for (i = 0; i < size; i++)
            d[i] = g[i] * CKPT_FN(ckpt_derivative)(v[i], act, alpha);
    }
}

/* gb += d.sum(axis=0) for an m x n d: each column's sum is in row order, ((gb + d0) + d1) + ...
 * Four rows per pass over gb, the same order with a quarter of gb's loads and stores. */
static void CKPT_FN(ckpt_column_sums)(const CKPT_REAL *d, CKPT_REAL *gb, ptrdiff_t m,
                                      ptrdiff_t n) {
    ptrdiff_t i, j;
    for (i = 0; i + 4 <= m; i += 4) {
        const CKPT_REAL *r0 = d + i * n, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
        for (j = 0; j < n; j++)
            gb[j] = (((gb[j] + r0[j]) + r1[j]) + r2[j]) + r3[j];
    }
    for (; i < m; i++) {
        const CKPT_REAL *row = d + i * n;
        for (j = 0; j < n; j++)
            gb[j] += row[j];
    }
}

/* ---- optimizers (PyTorch's update rules) ---- */

/* p -= lr * g */
static void CKPT_FN(ckpt_sgd_step)(CKPT_REAL *p, const CKPT_REAL *g, ptrdiff_t n,
                                   CKPT_REAL lr) {
    ptrdiff_t i;
    for (i = 0; i < n; i++)
        p[i] -= lr * g[i];
}

/* d = g + wd p; buf = mu buf + d; p -= lr (d + mu buf if nesterov else buf); buf NULL: no
 * momentum (p -= lr d). One loop per case, so that each is branch-free. */
static void CKPT_FN(ckpt_sgd_momentum_step)(CKPT_REAL *p, const CKPT_REAL *g, CKPT_REAL *buf,
                                            ptrdiff_t n, CKPT_REAL lr, CKPT_REAL momentum,
                                            CKPT_REAL weight_decay, int nesterov) {
    ptrdiff_t i;
    CKPT_REAL d;
    if (buf == NULL) {
        for (i = 0; i < n; i++) {
            d = g[i] + weight_decay * p[i];
            p[i] -= lr * d;
        }
    } else if (nesterov) {
        for (i = 0; i < n; i++) {
            d = g[i] + weight_decay * p[i];
            buf[i] = momentum * buf[i] + d;
            d = d + momentum * buf[i];
            p[i] -= lr * d;
        }
    } else {
        for (i = 0; i < n; i++) {
            d = g[i] + weight_decay * p[i];
            buf[i] = momentum * buf[i] + d;
            p[i] -= lr * buf[i];
        }
    }
}

/* d = g + wd p; m = b1 m + (1-b1) d; v = b2 v + (1-b2) d^2; p = f p - s m / (sqrt(v/bc2) + eps) */
static void CKPT_FN(ckpt_adam_step)(CKPT_REAL *p, const CKPT_REAL *g, CKPT_REAL *m,
                                    CKPT_REAL *v, ptrdiff_t n, CKPT_REAL step_size,
                                    CKPT_REAL beta1, CKPT_REAL beta2, CKPT_REAL eps,
                                    CKPT_REAL inv_sqrt_bc2, CKPT_REAL weight_decay,
                                    CKPT_REAL decay_factor) {
    ptrdiff_t i;
    CKPT_REAL d, mi, vi;
    for (i = 0; i < n; i++) {
        d = g[i] + weight_decay * p[i];
        mi = (CKPT_REAL)(beta1 * m[i] + (1.0 - beta1) * d);
        vi = (CKPT_REAL)(beta2 * v[i] + (1.0 - beta2) * d * d);
        m[i] = mi;
        v[i] = vi;
        p[i] = decay_factor * p[i] - step_size * mi / (CKPT_SQRT(vi) * inv_sqrt_bc2 + eps);
    }
}

/* ---- LayerNorm (as PyTorch: biased variance, eps inside the square root) ---- */

static inline double CKPT_FN(ckpt_lanes_total)(const double *acc) {
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* Mean and 1 / sqrt(var + eps) of one row of n values, two passes in double. */
static inline void CKPT_FN(ckpt_row_stats)(const CKPT_REAL *row, ptrdiff_t n, double eps,
                                           double *mean, double *rstd) {
    ptrdiff_t j, l, body = n - n % CKPT_LANES;
    double acc[CKPT_LANES];
    double total, d, var;
    for (l = 0; l < CKPT_LANES; l++)
        acc[l] = 0;
    for (j = 0; j < body; j += CKPT_LANES)
        for (l = 0; l < CKPT_LANES; l++)
            acc[l] += row[j + l];
    total = CKPT_FN(ckpt_lanes_total)(acc);
    for (j = body; j < n; j++)
        total += row[j];
    *mean = total / n;
    for (l = 0; l < CKPT_LANES; l++)
        acc[l] = 0;
    for (j = 0; j < body; j += CKPT_LANES)
        for (l = 0; l < CKPT_LANES; l++) {
            d = row[j + l] - *mean;
            acc[l] += d * d;
        }
    var = CKPT_FN(ckpt_lanes_total)(acc);
    for (j = body; j < n; j++) {
        d = row[j] - *mean;
        var += d * d;
    }
    *rstd = 1.0 / sqrt(var / n + eps);
}

/* y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta, row by row. */
static void CKPT_FN(ckpt_layernorm_forward)(const CKPT_REAL *x, const CKPT_REAL *gamma,
                                            const CKPT_REAL *beta, CKPT_REAL *y, ptrdiff_t m,
                                            ptrdiff_t n, double eps) {
    ptrdiff_t i, j;
    double mean, rstd;
    CKPT_REAL mu, r;
    for (i = 0; i < m; i++) {
        const CKPT_REAL *row = x + i * n;
        CKPT_REAL *out = y + i * n;
        CKPT_FN(ckpt_row_stats)(row, n, eps, &mean, &rstd);
        mu = (CKPT_REAL)mean;
        r = (CKPT_REAL)rstd;
        for (j = 0; j < n; j++)
            out[j] = (row[j] - mu) * r * gamma[j] + beta[j];
    }
}

/* ggamma += sum(g * xhat); gbeta += sum(g); gx = rstd (g gamma - mean(g gamma)
 * - xhat mean(g gamma xhat)) (skipped if gx is NULL). The statistics are recomputed from x. */
static void CKPT_FN(ckpt_layernorm_backward)(const CKPT_REAL *x, const CKPT_REAL *gamma,
                                             const CKPT_REAL *g, CKPT_REAL *gx,
                                             CKPT_REAL *ggamma, CKPT_REAL *gbeta, ptrdiff_t m,
                                             ptrdiff_t n, double eps) {
    ptrdiff_t i, j, l, body = n - n % CKPT_LANES;
    double mean, rstd, s1, s2, dxh;
    double acc1[CKPT_LANES], acc2[CKPT_LANES];
    CKPT_REAL mu, r, xh, a, b;
    for (i = 0; i < m; i++) {
        const CKPT_REAL *row = x + i * n;
        const CKPT_REAL *grow = g + i * n;
        CKPT_REAL *out;
        CKPT_FN(ckpt_row_stats)(row, n, eps, &mean, &rstd);
        mu = (CKPT_REAL)mean;
        r = (CKPT_REAL)rstd;
        for (j = 0; j < n; j++) {
            xh = (row[j] - mu) * r;
            ggamma[j] += grow[j] * xh;
            gbeta[j] += grow[j];
        }
        if (gx == NULL)
            continue;
        for (l = 0; l < CKPT_LANES; l++) {
            acc1[l] = 0;
            acc2[l] = 0;
        }
        for (j = 0; j < body; j += CKPT_LANES)
            for (l = 0; l < CKPT_LANES; l++) {
                xh = (row[j + l] - mu) * r;
                dxh = grow[j + l] * gamma[j + l];
                acc1[l] += dxh;
                acc2[l] += dxh * xh;
            }
        s1 = CKPT_FN(ckpt_lanes_total)(acc1);
        s2 = CKPT_FN(ckpt_lanes_total)(acc2);
        for (j = body; j < n; j++) {
            xh = (row[j] - mu) * r;
            dxh = grow[j] * gamma[j];
            s1 += dxh;
            s2 += dxh * xh;
        }
        out = gx + i * n;
        a = (CKPT_REAL)(s1 / n);
        b = (CKPT_REAL)(s2 / n);
        for (j = 0; j < n; j++) {
            xh = (row[j] - mu) * r;
            out[j] = r * (grow[j] * gamma[j] - a - xh * b);
        }
    }
}

/* ---- Dropout (inverted); the mask is recomputed from (key, row, column), never stored ---- */

/* dst = src * mask * scale; mask[r, c] = bits(key, row0 + r, c) >= threshold. A product, not a
 * select, so NaN in a dropped value stays NaN (as in PyTorch). Also applies the mask in backward. */
static void CKPT_FN(ckpt_dropout)(const CKPT_REAL *src, CKPT_REAL *dst, ptrdiff_t m,
                                  ptrdiff_t n, uint64_t key, int64_t row0, uint64_t threshold,
                                  CKPT_REAL scale) {
    ptrdiff_t i, j;
    for (i = 0; i < m; i++) {
        uint64_t row = (uint64_t)(row0 + i);
        const CKPT_REAL *s = src + i * n;
        CKPT_REAL *d = dst + i * n;
        for (j = 0; j < n; j++)
            d[j] = s[j] * (ckpt_dropout_bits(key, row, (uint64_t)j) >= threshold
                           ? scale : (CKPT_REAL)0);
    }
}
