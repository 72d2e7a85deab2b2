/* ckpt's persistent worker pool: plain pthreads, no OpenMP.
 *
 * ckpt_pool_run(n, fn, arg) runs fn(arg, 0) .. fn(arg, n - 1) and returns when all are done,
 * on the calling thread and up to n - 1 workers (started on first use, then kept, polling
 * briefly, then sleeping on a condition variable between jobs). Each task writes only its own
 * data, so results never depend on timing -- nor on which thread runs it: the threads claim
 * indices in turn from one counter (ckpt_pool_claim), and the caller keeps claiming until none
 * is left. A worker that is slow to wake, or that another process's thread holds off its core
 * (a shared machine), therefore never stalls the job: the caller runs the task itself, instead
 * of waiting a whole scheduler time slice for a fixed owner.
 *
 * One job at a time: a caller that finds the pool busy (another thread's job) runs its n tasks
 * itself, one after the other -- the same results, only slower. A task must not call
 * ckpt_pool_run.
 *
 * While a job runs, OpenBLAS is set to one thread (its thread count is process-wide in this
 * OpenBLAS: there is no per-thread setting), so that the tasks' GEMMs run single-threaded on
 * their own cores instead of contending for OpenBLAS's server; the count is restored after.
 * ckpt_pool_blas_threads() reports the count to restore while a job runs (what
 * ckpt.get_num_threads() must see), else 0.
 *
 * fork: a pthread_atfork child handler resets the pool to "no workers, not busy" -- the
 * workers do not exist in the child -- so a forked process (joblib, multiprocessing) starts
 * its own workers on its first job instead of waiting forever for the parent's. A fork taken
 * while another thread's job runs leaves the child's OpenBLAS at the job's one thread
 * (restoring it from inside an atfork handler would start OpenBLAS threads there). */
#ifndef CKPT_POOL_H
#define CKPT_POOL_H

#include <pthread.h>
#include <sched.h>
#include <signal.h>

#define CKPT_POOL_MAX 256
/* Polls of a worker for the next job (and of the caller for the end of one) before sleeping on
 * the condition variable, so that the phases of a step (forward, backward, reduction), which
 * follow each other within microseconds, skip the futex wake-up. An idle worker only pauses
 * the core for its first CKPT_POOL_PAUSES polls (a few microseconds), then yields it
 * (sched_yield) at each poll, so that it never holds a core another runnable thread needs --
 * the caller's, when the machine has fewer free cores than the pool has threads (a shared
 * machine; another process's BLAS threads spinning): spinning there cost the split step half
 * its speed. The caller, waiting for tasks a running worker claimed, only pauses: yielding
 * would hand its core to another process for a whole time slice. */
#define CKPT_POOL_SPIN 4000
#define CKPT_POOL_PAUSES 200

static inline void ckpt_pool_relax(int polls, int pauses) {
    if (polls >= pauses) {
        sched_yield();
        return;
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

typedef void (*ckpt_task)(void *arg, int index);

typedef struct {
    pthread_mutex_t lock;       /* protects everything below */
    pthread_cond_t wake;        /* workers wait here for a new generation */
    pthread_cond_t done;        /* the caller waits here for pending == 0 */
    pthread_mutex_t dispatch;   /* held by the thread whose job runs */
    int n_workers;              /* workers started (indices 1 .. n_workers) */
    unsigned long generation;   /* bumped by each job */
    ckpt_task fn;
    void *arg;
    int n_tasks;
    int pending;                /* tasks of this job not finished */
    unsigned long claim;        /* (generation << 16) | the next index to hand out */
    int atfork_registered;
    int saved_blas;             /* OpenBLAS threads to restore after the job (0: no job) */
} ckpt_pool_t;

static ckpt_pool_t ckpt_pool = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
    PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, 0};

typedef struct {
    unsigned long generation;   /* the generation when it was started: it waits for the next */
} ckpt_worker_arg;

static ckpt_worker_arg ckpt_worker_args[CKPT_POOL_MAX];

#define CKPT_POOL_INDEX_BITS 16   /* > log2(CKPT_POOL_MAX) */

/* The next unclaimed task index of job `generation` (n tasks), or -1 when none is left or the
 * job is over. The claim word carries the generation, so a worker that read a job's fn and arg
 * and was then held off until a later job began can never take that later job's index. */
static inline int ckpt_pool_claim(unsigned long generation, int n) {
    unsigned long word = __atomic_load_n(&ckpt_pool.claim, __ATOMIC_ACQUIRE);
    for (;;) {
        int index = (int)(word & ((1UL << CKPT_POOL_INDEX_BITS) - 1));
        if (word >> CKPT_POOL_INDEX_BITS != (generation & (~0UL >> CKPT_POOL_INDEX_BITS))
                || index >= n)
            return -1;
        if (__atomic_compare_exchange_n(&ckpt_pool.claim, &word, word + 1, 1, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return index;
    }
}

/* Run claimed tasks of the current job until none is left; lock not held. */
static inline void ckpt_pool_drain(unsigned long generation, int n, ckpt_task fn, void *arg) {
    int index;
    while ((index = ckpt_pool_claim(generation, n)) >= 0) {
        fn(arg, index);
        if (__atomic_sub_fetch(&ckpt_pool.pending, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&ckpt_pool.lock);
            pthread_cond_signal(&ckpt_pool.done);
            pthread_mutex_unlock(&ckpt_pool.lock);
        }
    }
}

static void *ckpt_pool_worker(void *p) {
    unsigned long seen;
    ckpt_task fn;
    void *arg;
    int n;
    pthread_mutex_lock(&ckpt_pool.lock);
    seen = ((ckpt_worker_arg *)p)->generation;
    int spins;
    for (;;) {
        while (ckpt_pool.generation == seen) {
            pthread_mutex_unlock(&ckpt_pool.lock);
            for (spins = 0; spins < CKPT_POOL_SPIN
                 && __atomic_load_n(&ckpt_pool.generation, __ATOMIC_ACQUIRE) == seen; spins++)
                ckpt_pool_relax(spins, CKPT_POOL_PAUSES);
            pthread_mutex_lock(&ckpt_pool.lock);
            if (ckpt_pool.generation != seen)
                break;
            pthread_cond_wait(&ckpt_pool.wake, &ckpt_pool.lock);
        }
        seen = ckpt_pool.generation;
        fn = ckpt_pool.fn;
        arg = ckpt_pool.arg;
        n = ckpt_pool.n_tasks;
        pthread_mutex_unlock(&ckpt_pool.lock);
        ckpt_pool_drain(seen, n, fn, arg);
        pthread_mutex_lock(&ckpt_pool.lock);
    }
    return NULL;
}

static void ckpt_pool_atfork_child(void) {
    /* Only the forking thread exists in the child: no workers, no job. */
    pthread_mutex_init(&ckpt_pool.lock, NULL);
    pthread_mutex_init(&ckpt_pool.dispatch, NULL);
    pthread_cond_init(&ckpt_pool.wake, NULL);
    pthread_cond_init(&ckpt_pool.done, NULL);
    ckpt_pool.n_workers = 0;
    ckpt_pool.generation = 0;
    ckpt_pool.n_tasks = 0;
    ckpt_pool.pending = 0;
    ckpt_pool.claim = 0;
    ckpt_pool.fn = 0;
    ckpt_pool.arg = 0;
    __atomic_store_n(&ckpt_pool.saved_blas, 0, __ATOMIC_SEQ_CST);
}

/* Start workers up to index n - 1 (lock held). Returns how many exist afterwards. */
static int ckpt_pool_grow(int n) {
    sigset_t all, old;
    pthread_t thread;
    pthread_attr_t attr;
    if (!ckpt_pool.atfork_registered) {
        if (pthread_atfork(NULL, NULL, ckpt_pool_atfork_child) != 0)
            return ckpt_pool.n_workers;   /* no fork safety: start no thread */
        ckpt_pool.atfork_registered = 1;
    }
    if (n - 1 <= ckpt_pool.n_workers)
        return ckpt_pool.n_workers;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* workers never take signals */
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (ckpt_pool.n_workers < n - 1 && ckpt_pool.n_workers + 1 < CKPT_POOL_MAX) {
        ckpt_worker_args[ckpt_pool.n_workers + 1].generation = ckpt_pool.generation;
        if (pthread_create(&thread, &attr, ckpt_pool_worker,
                           &ckpt_worker_args[ckpt_pool.n_workers + 1]) != 0)
            break;
        ckpt_pool.n_workers++;
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return ckpt_pool.n_workers;
}

/* OpenBLAS's thread controls (the scipy-openblas32 wheel's prefixed names). */
void scipy_openblas_set_num_threads(int num_threads);
int scipy_openblas_get_num_threads(void);

static inline int ckpt_pool_blas_threads(void) {
    return __atomic_load_n(&ckpt_pool.saved_blas, __ATOMIC_SEQ_CST);
}

/* Record a new BLAS thread count asked for while a job runs: it is what the job restores.
 * Returns 1 if a job is running (the caller must not set OpenBLAS now), else 0. */
static inline int ckpt_pool_defer_blas(int n) {
    int seen = __atomic_load_n(&ckpt_pool.saved_blas, __ATOMIC_SEQ_CST);
    while (seen > 0) {
        if (__atomic_compare_exchange_n(&ckpt_pool.saved_blas, &seen, n, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return 1;
    }
    return 0;
}

static inline int ckpt_pool_workers(void) {
    int n;
    pthread_mutex_lock(&ckpt_pool.lock);
    n = ckpt_pool.n_workers;
    pthread_mutex_unlock(&ckpt_pool.lock);
    return n;
}

/* Run fn(arg, i) for i in 0 .. n - 1; returns the number of threads that could take them (1
 * when the pool was busy or n <= 1; the caller plus the workers otherwise). */
static int ckpt_pool_run(int n, ckpt_task fn, void *arg) {
    int i, have, blas = 0;
    unsigned long generation;
    if (n <= 1 || n >= (1 << CKPT_POOL_INDEX_BITS)
            || pthread_mutex_trylock(&ckpt_pool.dispatch) != 0) {
        for (i = 0; i < n; i++)
            fn(arg, i);
        return 1;
    }
    blas = scipy_openblas_get_num_threads();
    __atomic_store_n(&ckpt_pool.saved_blas, blas, __ATOMIC_SEQ_CST);
    if (blas != 1)
        scipy_openblas_set_num_threads(1);
    pthread_mutex_lock(&ckpt_pool.lock);
    have = ckpt_pool_grow(n);
    ckpt_pool.fn = fn;
    ckpt_pool.arg = arg;
    ckpt_pool.n_tasks = n;
    __atomic_store_n(&ckpt_pool.pending, n, __ATOMIC_SEQ_CST);
    generation = __atomic_add_fetch(&ckpt_pool.generation, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&ckpt_pool.claim, generation << CKPT_POOL_INDEX_BITS, __ATOMIC_RELEASE);
    if (have > 0)
        pthread_cond_broadcast(&ckpt_pool.wake);
    pthread_mutex_unlock(&ckpt_pool.lock);
    ckpt_pool_drain(generation, n, fn, arg);
    for (i = 0; i < CKPT_POOL_SPIN && __atomic_load_n(&ckpt_pool.pending, __ATOMIC_ACQUIRE) > 0;
         i++)
        ckpt_pool_relax(i, CKPT_POOL_SPIN);
    pthread_mutex_lock(&ckpt_pool.lock);
    while (__atomic_load_n(&ckpt_pool.pending, __ATOMIC_ACQUIRE) > 0)
        pthread_cond_wait(&ckpt_pool.done, &ckpt_pool.lock);
    pthread_mutex_unlock(&ckpt_pool.lock);
    blas = __atomic_exchange_n(&ckpt_pool.saved_blas, 0, __ATOMIC_SEQ_CST);
    if (blas != 1)
        scipy_openblas_set_num_threads(blas);
    pthread_mutex_unlock(&ckpt_pool.dispatch);
    return have + 1 < n ? have + 1 : n;
}

#endif
