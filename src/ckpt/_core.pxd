# Shared C-level declarations of _core: the tracker's atomic counters (see _atomic.h).

from libc.stdint cimport int64_t

cdef extern from "_atomic.h" nogil:
    ctypedef struct ckpt_counters:
        int64_t stored
        int64_t recomputed
        int64_t gradient
        int64_t held
        int64_t peak
    void ckpt_record_stored(ckpt_counters *c, int64_t nbytes)
    int64_t ckpt_release_stored(ckpt_counters *c, int64_t nbytes)
    void ckpt_record_gradient(ckpt_counters *c, int64_t nbytes)
    int64_t ckpt_release_gradient(ckpt_counters *c, int64_t nbytes)
    void ckpt_record_recomputed(ckpt_counters *c, int64_t nbytes)
    int64_t ckpt_load(const int64_t *counter)
    void ckpt_reset(ckpt_counters *c)
    void ckpt_raise_peak(ckpt_counters *c, int64_t value)


cdef class AtomicCounters:
    cdef ckpt_counters c
