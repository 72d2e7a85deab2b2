/* ckpt's persistent worker pool: plain pthreads, no OpenMP.
 *
 * ckpt_pool_run(n, fn, arg) runs fn(arg, 0) .. fn(arg, n - 1) and returns when all are done:
 * index 0 on the calling thread, index i >= 1 on worker i (started on first use, then kept,
 * polling briefly, then sleeping on a condition variable between jobs). Which thread runs which index is fixed, and
 * every task writes only its own data, so results never depend on timing.
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
#include <signal.h>

#define CKPT_POOL_MAX 256
/* Polls of a worker for the next job (and of the caller for the end of one) before sleeping on
 * the condition variable: about 0.1-0.5 ms, so the phases of a step (forward, backward,
 * reduction), which follow each other within microseconds, skip the futex wake-up. */
#define CKPT_POOL_SPIN 20000

static inline void ckpt_pool_relax(void) {
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
    int pending;                /* worker tasks of this job not finished */
    int atfork_registered;
    int saved_blas;             /* OpenBLAS threads to restore after the job (0: no job) */
} ckpt_pool_t;

static ckpt_pool_t ckpt_pool = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
    PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0};

typedef struct {
    int index;
    unsigned long generation;   /* the generation when it was started: it waits for the next */
} ckpt_worker_arg;

static ckpt_worker_arg ckpt_worker_args[CKPT_POOL_MAX];

static void *ckpt_pool_worker(void *p) {
    int index = ((ckpt_worker_arg *)p)->index;
    unsigned long seen;
    ckpt_task fn;
    void *arg;
    pthread_mutex_lock(&ckpt_pool.lock);
    seen = ((ckpt_worker_arg *)p)->generation;
    int spins;
    for (;;) {
        while (ckpt_pool.generation == seen) {
            pthread_mutex_unlock(&ckpt_pool.lock);
            for (spins = 0; spins < CKPT_POOL_SPIN
                 && __atomic_load_n(&ckpt_pool.generation, __ATOMIC_ACQUIRE) == seen; spins++)
                ckpt_pool_relax();
            pthread_mutex_lock(&ckpt_pool.lock);
            if (ckpt_pool.generation != seen)
                break;
            pthread_cond_wait(&ckpt_pool.wake, &ckpt_pool.lock);
        }
        seen = ckpt_pool.generation;
        if (index >= ckpt_pool.n_tasks)
            continue;           /* not part of this job */
        fn = ckpt_pool.fn;
        arg = ckpt_pool.arg;
        pthread_mutex_unlock(&ckpt_pool.lock);
        fn(arg, index);
        pthread_mutex_lock(&ckpt_pool.lock);
        if (__atomic_sub_fetch(&ckpt_pool.pending, 1, __ATOMIC_SEQ_CST) == 0)
            pthread_cond_signal(&ckpt_pool.done);
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
        ckpt_worker_args[ckpt_pool.n_workers + 1].index = ckpt_pool.n_workers + 1;
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

/* Run fn(arg, i) for i in 0 .. n - 1; returns the number of threads that ran them (1 when the
 * pool was busy or n <= 1). */
static int ckpt_pool_run(int n, ckpt_task fn, void *arg) {
    int i, have, used, blas = 0;
    if (n <= 1 || pthread_mutex_trylock(&ckpt_pool.dispatch) != 0) {
        for (i = 0; i < n; i++)
            fn(arg, i);
        return 1;
    }
    if (n > CKPT_POOL_MAX)
        n = CKPT_POOL_MAX;
    blas = scipy_openblas_get_num_threads();
    __atomic_store_n(&ckpt_pool.saved_blas, blas, __ATOMIC_SEQ_CST);
    if (blas != 1)
        scipy_openblas_set_num_threads(1);
    pthread_mutex_lock(&ckpt_pool.lock);
    have = ckpt_pool_grow(n);
    used = have + 1 < n ? have + 1 : n;   /* tasks the workers cannot take run here */
    ckpt_pool.fn = fn;
    ckpt_pool.arg = arg;
    ckpt_pool.n_tasks = used;
    __atomic_store_n(&ckpt_pool.pending, used - 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&ckpt_pool.generation, 1, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&ckpt_pool.wake);
    pthread_mutex_unlock(&ckpt_pool.lock);
    fn(arg, 0);
    for (i = used; i < n; i++)
        fn(arg, i);
    for (i = 0; i < CKPT_POOL_SPIN && __atomic_load_n(&ckpt_pool.pending, __ATOMIC_ACQUIRE) > 0;
         i++)
        ckpt_pool_relax();
    pthread_mutex_lock(&ckpt_pool.lock);
    while (ckpt_pool.pending > 0)
        pthread_cond_wait(&ckpt_pool.done, &ckpt_pool.lock);
    pthread_mutex_unlock(&ckpt_pool.lock);
    blas = __atomic_exchange_n(&ckpt_pool.saved_blas, 0, __ATOMIC_SEQ_CST);
    if (blas != 1)
        scipy_openblas_set_num_threads(blas);
    pthread_mutex_unlock(&ckpt_pool.dispatch);
    return used;
}

#endif
