/* Counter-based random numbers for Dropout: a mask bit is a pure function of
 * (per-step seed, stream, global row, column), so the first forward, every recomputation and
 * the backward see the same mask and no mask is ever stored.
 *
 * The generator is SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number
 * generators", OOPSLA 2014) read at random positions: the output for counter c under key k is
 * mix64(k + c * GAMMA), mix64 being its 64-bit finalizer. The key mixes the step's seed with the
 * Dropout layer's stream id; the counter is (row << 32) | column. ckpt._reference.dropout_mask
 * is the NumPy twin, bit for bit. */
#ifndef CKPT_RNG_H
#define CKPT_RNG_H

#include <stdint.h>

#define CKPT_GAMMA UINT64_C(0x9E3779B97F4A7C15)

static inline uint64_t ckpt_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static inline uint64_t ckpt_dropout_key(uint64_t seed, uint64_t stream) {
    return ckpt_mix64(seed ^ ckpt_mix64(stream));
}

/* The 32 high bits of the random word of (row, column): keep the value iff they are >= the
 * threshold floor(p * 2^32). */
static inline uint64_t ckpt_dropout_bits(uint64_t key, uint64_t row, uint64_t column) {
    return ckpt_mix64(key + ((row << 32) | column) * CKPT_GAMMA) >> 32;
}

#endif
