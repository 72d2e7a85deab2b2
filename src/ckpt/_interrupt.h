/* Ctrl-C during a compiled phase: the state the executor's slices share while one phase runs.
 *
 * A phase runs without the GIL, so Python's SIGINT handler (which only sets a flag in C) cannot
 * raise KeyboardInterrupt until the phase ends -- minutes, on a large chain. So the thread that
 * started the phase, if it is the main thread (the only one Python runs signal handlers on),
 * takes the GIL between two schedule rows about every CKPT_POLL_NS and runs the pending
 * handlers (PyErr_CheckSignals). A handler that raises sets `stop`; every slice, on any thread,
 * reads it before its next row and leaves the phase. The exception is kept here and raised when
 * the phase returns. How long Ctrl-C waits is then at most one row (one element's forward or
 * backward) plus CKPT_POLL_NS. */
#ifndef CKPT_INTERRUPT_H
#define CKPT_INTERRUPT_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#define CKPT_POLL_NS 50000000LL   /* 50 ms: a GIL round trip that often costs nothing measurable */

typedef struct {
    int stop;               /* set once a handler raised: every slice leaves at its next row */
    int poll;               /* the phase was started on the main thread */
    pthread_t caller;       /* that thread: only it takes the GIL to poll */
    int64_t next_ns;        /* CKPT_POLL_CLOCK time of the next poll */
    void *exc_type, *exc_value, *exc_traceback;   /* what the handler raised (owned refs) */
} ckpt_interrupt;

/* The coarse clock (a few ms resolution, a memory read in the vDSO): this runs every row. */
#ifdef CLOCK_MONOTONIC_COARSE
#define CKPT_POLL_CLOCK CLOCK_MONOTONIC_COARSE
#else
#define CKPT_POLL_CLOCK CLOCK_MONOTONIC
#endif

static inline int64_t ckpt_now_ns(void) {
    struct timespec ts;
    clock_gettime(CKPT_POLL_CLOCK, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Begin a phase: no stop, the first poll one period from now. */
static inline void ckpt_interrupt_begin(ckpt_interrupt *it, int poll) {
    it->stop = 0;
    it->poll = poll;
    it->caller = pthread_self();
    it->next_ns = ckpt_now_ns() + CKPT_POLL_NS;
    it->exc_type = it->exc_value = it->exc_traceback = 0;
}

static inline int ckpt_interrupt_stopped(ckpt_interrupt *it) {
    return __atomic_load_n(&it->stop, __ATOMIC_ACQUIRE);
}

static inline void ckpt_interrupt_set(ckpt_interrupt *it) {
    __atomic_store_n(&it->stop, 1, __ATOMIC_RELEASE);
}

/* 1 when the calling thread should poll for signals now (and the next poll is scheduled). */
static inline int ckpt_interrupt_due(ckpt_interrupt *it) {
    int64_t now;
    if (!it->poll || !pthread_equal(pthread_self(), it->caller))
        return 0;
    now = ckpt_now_ns();
    if (now < it->next_ns)
        return 0;
    it->next_ns = now + CKPT_POLL_NS;
    return 1;
}

#endif
