/* Lock-free byte counters for MemoryUsageTracker, on the GCC/Clang __atomic builtins.
 *
 * Four counters: stored activations, recomputed (cumulative), gradients, peak. The peak is the
 * exact maximum ever reached by stored + gradients: every change also moves a fifth counter,
 * `held`, by the same delta with one atomic add, and the value that add returns is folded into
 * `peak` with a compare-and-swap loop. Counting is exact; the tracker never reads clocks. */
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
    ckpt_raise_peak(c, __atomic_add_fetch(&c->held, bytes, __ATOMIC_SEQ_CST));
    __atomic_add_fetch(component, bytes, __ATOMIC_SEQ_CST);
}

/* Subtract at most what is held (clamping at zero) and return what was really released. */
static inline int64_t ckpt_release_held(ckpt_counters *c, int64_t *component, int64_t bytes) {
    int64_t seen = __atomic_load_n(component, __ATOMIC_RELAXED);
    int64_t take;
    do {
        take = bytes < seen ? bytes : seen;
    } while (!__atomic_compare_exchange_n(component, &seen, seen - take, 1,
                                          __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    __atomic_sub_fetch(&c->held, take, __ATOMIC_SEQ_CST);
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
    __atomic_add_fetch(&c->recomputed, bytes, __ATOMIC_RELAXED);
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
