/* Runtime CPU dispatch of ckpt's elementwise kernels.
 *
 * _simd_kernels.h is compiled three times on x86-64 -- for the baseline instruction set (SSE2,
 * what every x86-64 CPU has), for AVX2 and for AVX-512 (F, VL, BW, DQ: Skylake-SP and later) --
 * each time for float and double, the AVX copies under `#pragma GCC target`. Only those copies
 * contain AVX instructions, and nothing calls them unless the CPU (and the OS, which must save
 * the wider registers) supports them, so one wheel runs on every x86-64 CPU and uses the best
 * copy. Elsewhere (other architectures, or a compiler other than GCC) only the baseline copy is
 * built.
 *
 * A table of function pointers per variant; ckpt_simd_kernels() is the active one. _core.pyx
 * chooses it once at import (the best the CPU supports, or the CKPT_SIMD environment variable)
 * and its private _set_simd switches it, for tests, while no kernel runs.
 *
 * Every variant gives the same bits (see _simd_kernels.h): this needs -ffp-contract=off, which
 * setup.py passes. */
#ifndef CKPT_SIMD_H
#define CKPT_SIMD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "_rng.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CKPT_SIMD_X86 1
#else
#define CKPT_SIMD_X86 0
#endif

/* Activation codes; ckpt.activations (the activation table) reads their names from
 * ckpt_act_name, and a test checks that the two agree. */
enum {
    CKPT_ACT_IDENTITY = 0,
    CKPT_ACT_RELU = 1,
    CKPT_ACT_LEAKY_RELU = 2,
    CKPT_ACT_TANH = 3,
    CKPT_ACT_SIGMOID = 4,
    CKPT_ACT_GELU = 5,
    CKPT_ACT_SOFTPLUS = 6,
    CKPT_ACT_SILU = 7,
    CKPT_ACT_COUNT = 8      /* sentinel: codes are 0 .. CKPT_ACT_COUNT - 1 */
};

/* The name of an activation code (NULL outside 0 .. CKPT_ACT_COUNT - 1). */
static inline const char *ckpt_act_name(int act) {
    static const char *const names[CKPT_ACT_COUNT] = {
        "identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu", "softplus", "silu"};
    return act >= 0 && act < CKPT_ACT_COUNT ? names[act] : NULL;
}

enum {
    CKPT_SIMD_BASELINE = 0,
    CKPT_SIMD_AVX2 = 1,
    CKPT_SIMD_AVX512 = 2,
    CKPT_SIMD_COUNT = 3
};

#define CKPT_SQRT1_2 0.70710678118654752440     /* 1 / sqrt(2) */
#define CKPT_INV_SQRT_2PI 0.3989422804014327    /* 1 / sqrt(2 pi) */
/* LayerNorm's row sums run in 8 interleaved double accumulators, added pairwise at the end. */
#define CKPT_LANES 8

#define CKPT_CAT_(a, b) a##b
#define CKPT_CAT(a, b) CKPT_CAT_(a, b)

/* Every variant, float then double: suffixes _f_<variant> and _d_<variant>. */
#define CKPT_REAL float
#define CKPT_SQRT sqrtf
#define CKPT_FN(name) CKPT_CAT(name##_f_, CKPT_VARIANT)

#include "_simd_variants.h"

#undef CKPT_REAL
#undef CKPT_SQRT
#undef CKPT_FN
#define CKPT_REAL double
#define CKPT_SQRT sqrt
#define CKPT_FN(name) CKPT_CAT(name##_d_, CKPT_VARIANT)

#include "_simd_variants.h"

#undef CKPT_REAL
#undef CKPT_SQRT
#undef CKPT_FN

/* The kernels of one variant, for one type R with suffix s. */
#define CKPT_SIMD_FIELDS(R, s)                                                                  \
    void (*bias_activate_##s)(R *y, const R *b, ptrdiff_t m, ptrdiff_t n, int act, R alpha);   \
    void (*delta_##s)(const R *g, const R *v, R *d, ptrdiff_t size, int act, R alpha);         \
    void (*column_sums_##s)(const R *d, R *gb, ptrdiff_t m, ptrdiff_t n);                      \
    void (*sgd_step_##s)(R *p, const R *g, ptrdiff_t n, R lr);                                 \
    void (*sgd_momentum_step_##s)(R *p, const R *g, R *buf, ptrdiff_t n, R lr, R momentum,     \
                                  R weight_decay, int nesterov);                               \
    void (*adam_step_##s)(R *p, const R *g, R *m, R *v, ptrdiff_t n, R step_size, R beta1,     \
                          R beta2, R eps, R inv_sqrt_bc2, R weight_decay, R decay_factor);     \
    void (*layernorm_forward_##s)(const R *x, const R *gamma, const R *beta, R *y, ptrdiff_t m, \
                                  ptrdiff_t n, double eps);                                    \
    void (*layernorm_backward_##s)(const R *x, const R *gamma, const R *g, R *gx, R *ggamma,   \
                                   R *gbeta, ptrdiff_t m, ptrdiff_t n, double eps);            \
    void (*dropout_##s)(const R *src, R *dst, ptrdiff_t m, ptrdiff_t n, uint64_t key,          \
                        int64_t row0, uint64_t threshold, R scale);

typedef struct {
    const char *name;
    CKPT_SIMD_FIELDS(float, f)
    CKPT_SIMD_FIELDS(double, d)
} ckpt_simd_table;

#define CKPT_SIMD_ENTRIES(s, v)                                                                 \
    .bias_activate_##s = ckpt_bias_activate_##s##_##v, .delta_##s = ckpt_delta_##s##_##v,      \
    .column_sums_##s = ckpt_column_sums_##s##_##v, .sgd_step_##s = ckpt_sgd_step_##s##_##v,    \
    .sgd_momentum_step_##s = ckpt_sgd_momentum_step_##s##_##v,                                 \
    .adam_step_##s = ckpt_adam_step_##s##_##v,                                                 \
    .layernorm_forward_##s = ckpt_layernorm_forward_##s##_##v,                                 \
    .layernorm_backward_##s = ckpt_layernorm_backward_##s##_##v,                               \
    .dropout_##s = ckpt_dropout_##s##_##v

#define CKPT_SIMD_TABLE(name, v) {name, CKPT_SIMD_ENTRIES(f, v), CKPT_SIMD_ENTRIES(d, v)}

/* Indexed by CKPT_SIMD_*. Without the AVX copies, their rows are the baseline's under their own
 * names, never selected: ckpt_simd_supported says no. */
static const ckpt_simd_table ckpt_simd_tables[CKPT_SIMD_COUNT] = {
    CKPT_SIMD_TABLE("baseline", baseline),
#if CKPT_SIMD_X86
    CKPT_SIMD_TABLE("avx2", avx2),
    CKPT_SIMD_TABLE("avx512", avx512),
#else
    CKPT_SIMD_TABLE("avx2", baseline),
    CKPT_SIMD_TABLE("avx512", baseline),
#endif
};

/* The active table. Read with relaxed atomics: switching while kernels run in other threads is
 * not supported (a step could mix variants), but it is not a data race either. */
static const ckpt_simd_table *ckpt_simd_active_table = &ckpt_simd_tables[CKPT_SIMD_BASELINE];

static inline const ckpt_simd_table *ckpt_simd_kernels(void) {
    return __atomic_load_n(&ckpt_simd_active_table, __ATOMIC_RELAXED);
}

/* Whether this CPU and OS can run a variant (0 for codes outside 0 .. CKPT_SIMD_COUNT - 1).
 * libgcc's CPU model checks the OS's saved register state (XCR0) as well as the CPUID bits. */
static inline int ckpt_simd_supported(int variant) {
    if (variant == CKPT_SIMD_BASELINE)
        return 1;
#if CKPT_SIMD_X86
    __builtin_cpu_init();
    if (variant == CKPT_SIMD_AVX2)
        return __builtin_cpu_supports("avx2") != 0;
    if (variant == CKPT_SIMD_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
               && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
    return 0;
}

/* The best variant this CPU supports. */
static inline int ckpt_simd_best(void) {
    int v;
    for (v = CKPT_SIMD_COUNT - 1; v > CKPT_SIMD_BASELINE; v--)
        if (ckpt_simd_supported(v))
            return v;
    return CKPT_SIMD_BASELINE;
}

/* Make a variant the active one; -1 (nothing changed) if the CPU does not support it. */
static inline int ckpt_simd_select(int variant) {
    if (!ckpt_simd_supported(variant))
        return -1;
    __atomic_store_n(&ckpt_simd_active_table, &ckpt_simd_tables[variant], __ATOMIC_RELAXED);
    return 0;
}

/* The active variant's code. */
static inline int ckpt_simd_active(void) {
    return (int)(ckpt_simd_kernels() - ckpt_simd_tables);
}

static inline const char *ckpt_simd_name(int variant) {
    return ckpt_simd_tables[variant].name;
}

#endif
