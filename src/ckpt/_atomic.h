/* Lock-free byte counters for MemoryUsageTracker, on the GCC/Clang __atomic builtins.
 *
 * Four counters: stored activations, recomputed (cumulative), gradients, peak. The peak is the
 * exact maximum ever reached by stored + gradients: every change also moves a fifth counter,
 * `held`, by the same delta with one atomic add, and the value that add returns is folded into
 * `peak` with a compare-and-swap loop. Counting is exact; the tracker never reads clocks.
 *
 * No counter wraps: every addition saturates at INT64_MAX (compare-and-swap loops, not plain
 * atomic adds), and `held` never goes below zero. Below INT64_MAX every figure is exact; a
 * figure that reached it reads INT64_MAX ("at least this much"), and after such a saturation
 * `held`, hence the peak, is only a lower bound. The cumulative `recomputed` is the figure that
 * can get there in practice. */
#ifndef CKPT_ATOMIC_H
#define CKPT_ATOMIC_H

#include <stdint.h>

typedef struct {
    int64_t stored;
    int64_t recomputed;
    int64_t gradient;
    int64_t held;
    int64_t peak;
} ckpt_counters;

/* *counter += bytes (bytes >= 0), stopping at INT64_MAX; returns the new value. */
static inline int64_t ckpt_saturating_add(int64_t *counter, int64_t bytes) {
    int64_t seen = __atomic_load_n(counter, __ATOMIC_RELAXED);
    int64_t next;
    do {
        next = seen > INT64_MAX - bytes ? INT64_MAX : seen + bytes;
    } while (!__atomic_compare_exchange_n(counter, &seen, next, 1,
                                          __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return next;
}

/* *counter -= bytes (bytes >= 0), stopping at zero. */
static inline void ckpt_clamped_sub(int64_t *counter, int64_t bytes) {
    int64_t seen = __atomic_load_n(counter, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(counter, &seen, seen > bytes ? seen - bytes : 0, 1,
                                        __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
}

static inline void ckpt_raise_peak(ckpt_counters *c, int64_t value) {
    int64_t seen = __atomic_load_n(&c->peak, __ATOMIC_RELAXED);
    while (value > seen &&
           !__atomic_compare_exchange_n(&c->peak, &seen, value, 1,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

/* Ordering keeps `held` >= the sum of the components at every instant: an add moves `held`
 * first, a release moves it last. A release can only take bytes whose record it has seen, so in
 * the order of updates to `held` every release follows its record and `held` never dips below
 * zero: the peak is the exact maximum of that (valid) order of events. */
static inline void ckpt_add_held(ckpt_counters *c, int64_t *component, int64_t bytes) {
    ckpt_raise_peak(c, ckpt_saturating_add(&c->held, bytes));
    ckpt_saturating_add(component, bytes);
}

/* Subtract at most what is held (clamping at zero) and return what was really released. */
static inline int64_t ckpt_release_held(ckpt_counters *c, int64_t *component, int64_t bytes) {
    int64_t seen = __atomic_load_n(component, __ATOMIC_RELAXED);
    int64_t take;
    do {
        take = bytes < seen ? bytes : seen;
    } while (!__atomic_compare_exchange_n(component, &seen, seen - take, 1,
                                          __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    ckpt_clamped_sub(&c->held, take);
    return take;
}

static inline void ckpt_record_stored(ckpt_counters *c, int64_t bytes) {
    ckpt_add_held(c, &c->stored, bytes);
}
static inline int64_t ckpt_release_stored(ckpt_counters *c, int64_t bytes) {
    return ckpt_release_held(c, &c->stored, bytes);
}
static inline void ckpt_record_gradient(ckpt_counters *c, int64_t bytes) {
    ckpt_add_held(c, &c->gradient, bytes);
}
static inline int64_t ckpt_release_gradient(ckpt_counters *c, int64_t bytes) {
    return ckpt_release_held(c, &c->gradient, bytes);
}
static inline void ckpt_record_recomputed(ckpt_counters *c, int64_t bytes) {
    ckpt_saturating_add(&c->recomputed, bytes);
}
static inline int64_t ckpt_load(const int64_t *counter) {
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}
static inline void ckpt_reset(ckpt_counters *c) {
    __atomic_store_n(&c->stored, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->recomputed, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->gradient, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->held, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->peak, 0, __ATOMIC_RELAXED);
}

#endif
