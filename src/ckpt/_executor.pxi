# The chain executor (included into _core.pyx): runs a compiled checkpointing schedule over a
# chain of elements, one compiled call per phase, GIL released, calling each element's kind
# through the kind table (each kind's .pxi, included after this file, registers itself).
#
# Python (ckpt.executor) builds the element table from the layers' descriptions (ckpt.costs):
# every size here -- tapes, scratch, widths -- is the description's, checked once at
# construction against what these loops need. ckpt.schedule builds the rows.

from libc.stdint cimport uint64_t
from libc.stdlib cimport qsort
from cpython.mem cimport PyMem_Realloc
from cpython.exc cimport PyErr_Fetch, PyErr_Restore
from cpython.ref cimport PyObject

cdef extern from "_pool.h" nogil:
    ctypedef void (*ckpt_task)(void *arg, int index) noexcept nogil
    int ckpt_pool_run(int n, ckpt_task fn, void *arg)
    int ckpt_pool_blas_threads()
    int ckpt_pool_defer_blas(int n)
    int ckpt_pool_workers()

cdef extern from "_interrupt.h" nogil:
    ctypedef struct ckpt_interrupt:
        void *exc_type
        void *exc_value
        void *exc_traceback
    void ckpt_interrupt_begin(ckpt_interrupt *it, int poll)
    int ckpt_interrupt_stopped(ckpt_interrupt *it)
    void ckpt_interrupt_set(ckpt_interrupt *it)
    int ckpt_interrupt_due(ckpt_interrupt *it)

cdef extern from "Python.h":
    # Declared here without Cython's "except -1", so that a nogil poll can take the exception.
    int _check_signals "PyErr_CheckSignals" ()
    unsigned long PyThread_get_thread_ident()

import threading as _threading

# Python runs signal handlers on its main thread only: phases started there poll for them.
cdef unsigned long _MAIN_THREAD = _threading.main_thread().ident

# _run's status when a signal handler raised during the phase (the phase stopped early).
cdef enum:
    INTERRUPTED = -2

# A compiled row: (op, element, output offset, recompute flag, tape offset, scratch offset);
# offsets in elements per batch row (-1: none), multiplied by the batch size here.
cdef enum:
    OP_FORWARD = 0   # a[i+1] = element i (a[i]), written at the output offset (-1: the output)
    OP_BACKWARD = 1  # back-propagate through element i; a[i+1] is freed
    OP_FREE = 2      # a[i] is no longer held

OP_CODES = {"forward": OP_FORWARD, "backward": OP_BACKWARD, "free": OP_FREE}

# Columns of the integer element table built by ckpt.executor (read by name, once, in
# Chain.__cinit__).
ELEMENT_COLUMNS = ("kind", "act", "n_in", "n_out", "param", "body", "body_len", "tape",
                   "forward_scratch", "backward_scratch", "inner_width", "stream",
                   "reads_output", "needs_preactivation")
# Columns of the real-valued table.
ELEMENT_REALS = ("alpha", "eps", "p")


cdef struct Element:
    int kind, act
    Py_ssize_t n_in, n_out
    double alpha            # Dense: leaky_relu slope
    double eps              # LayerNorm
    double p                # Dropout probability
    uint64_t stream         # Dropout stream id (its rank among the chain's Dropout layers)
    uint64_t threshold      # Dropout: floor(p * 2^32)
    Py_ssize_t param        # first parameter in the chain's flat list (W or gamma), -1: none
    Py_ssize_t body, body_len   # a block (Residual): its body, elements body .. body + body_len - 1
    Py_ssize_t tape, fwd_scratch, bwd_scratch   # per batch row, in elements
    Py_ssize_t inner_width  # Residual: each of its ping-pong buffers, per row
    bint reads_output       # its backward reads its output (ElementCost.reads_output)
    bint needs_preact       # Dense: its activation's derivative needs the pre-activation


# What one step's phases share: rows, dropout key, mode and parameter tables.
cdef struct Step:
    Py_ssize_t m
    int64_t row0
    uint64_t seed
    bint training
    bint overwrite          # backward sets the gradients (=) instead of adding to them
    void **params
    void **grads


# One batch slice of a step: its rows, its activation and tape tables, its part of the arena
# and of the gradient buffers. A step that is not split is one slice of the whole batch.
cdef struct Slice:
    Step step               # m = the slice's rows, row0 = the step's row offset + its start
    void **a                # n_elements + 1 activation pointers
    void **tapes
    void *output            # its rows of the caller's output
    void *arena             # its base: the arena's per-row size times its start
    const void *grad_output
    void *buf0
    void *buf1
    void *grad_input        # its rows of the input gradient, or NULL
    ckpt_counters *c        # slice 0 only (NULL for the others): see count_rows
    Py_ssize_t count_rows   # rows the tracker counts for each event (slice 0: the whole batch)
    ckpt_interrupt *intr    # the phase's stop flag and signal poll (shared by all slices)
    Py_ssize_t status


# What the pool's tasks read: one phase (or the gradient reduction) of a split step.
cdef struct Job:
    const Element *table
    Py_ssize_t n_elements
    const int64_t *rows
    Py_ssize_t n_rows
    Slice *slices
    Py_ssize_t n_slices
    bint is_double
    bint backward
    void **grads            # the real gradients (slice 0's)
    void **params           # the parameters (for the update)
    double lr               # the update's learning rate
    void **copies           # (n_slices - 1) x n_params: the other slices' gradient copies
    Py_ssize_t *sizes
    Py_ssize_t n_params
    Py_ssize_t total        # sum of sizes


cdef struct _Span:
    char *start
    char *end


cdef int _compare_spans(const void *a, const void *b) noexcept nogil:
    cdef const _Span *x = <const _Span *>a
    cdef const _Span *y = <const _Span *>b
    return -1 if x.start < y.start else (1 if x.start > y.start else 0)


# --------------------------------------------------------------------------------------------
# The kind table: what the executor calls for each element kind. Each kind's .pxi (included
# after this file) fills in its entry with _register_kind; its code is its place in the table.
# --------------------------------------------------------------------------------------------

ctypedef void (*forward_f)(const Element *table, const Element *e, Step *s, const float *x,
                           float *y, float *scratch, float *tape) noexcept nogil
ctypedef void (*forward_d)(const Element *table, const Element *e, Step *s, const double *x,
                           double *y, double *scratch, double *tape) noexcept nogil
ctypedef void (*backward_f)(const Element *table, const Element *e, Step *s, const float *x,
                            const float *y, float *d, const float *g, float *gx,
                            float *scratch, float *tape) noexcept nogil
ctypedef void (*backward_d)(const Element *table, const Element *e, Step *s, const double *x,
                            const double *y, double *d, const double *g, double *gx,
                            double *scratch, double *tape) noexcept nogil
# Checks an element's row against what its kernels need (with the GIL; sizes are the chain's
# parameter sizes).
ctypedef int (*check_fn)(const Element *table, const Element *e, Py_ssize_t index,
                         const Py_ssize_t *sizes, Py_ssize_t n_params) except -1

cdef struct KindOps:
    forward_f forward_f
    forward_d forward_d
    backward_f backward_f
    backward_d backward_d
    check_fn check
    bint has_body           # a block: its body is a range of later rows, its tape its internals
    bint is_gemm            # its forward is one n_in x n_out GEMM (the thread policy sizes by it)


DEF MAX_KINDS = 32
cdef KindOps _KIND_OPS[MAX_KINDS]
cdef int _n_kinds = 0
ELEMENT_KINDS = {}      # kind name -> code, in registration order


cdef int _register_kind(str name, KindOps ops) except -1:
    global _n_kinds
    if _n_kinds == MAX_KINDS:
        raise RuntimeError(f"the executor's kind table is full ({MAX_KINDS} kinds)")
    _KIND_OPS[_n_kinds] = ops
    ELEMENT_KINDS[name] = _n_kinds
    _n_kinds += 1
    return _n_kinds - 1


cdef int _check_param_size(const Element *e, Py_ssize_t j, Py_ssize_t expected, Py_ssize_t index,
                           const Py_ssize_t *sizes, Py_ssize_t n_params) except -1:
    """Parameter j of element ``index`` exists in the chain's list and has ``expected`` values."""
    if e.param < 0 or e.param + j >= n_params:
        raise ValueError(f"element {index}: parameter {e.param + j} is not in the "
                         f"{n_params} parameters")
    if sizes[e.param + j] != expected:
        raise ValueError(f"element {index}: parameter {j} has {sizes[e.param + j]} "
                         f"values, expected {expected}")
    return 0


cdef inline void _forward(const Element *table, const Element *e, Step *s, const floating *x,
                          floating *y, floating *scratch, floating *tape) noexcept nogil:
    """y = element(x). scratch holds e.fwd_scratch elements per row; tape, if not NULL,
    receives the element's internals (e.tape per row) for its backward."""
    if floating is float:
        _KIND_OPS[e.kind].forward_f(table, e, s, x, y, scratch, tape)
    else:
        _KIND_OPS[e.kind].forward_d(table, e, s, x, y, scratch, tape)


cdef inline void _backward(const Element *table, const Element *e, Step *s, const floating *x,
                           const floating *y, floating *d, const floating *g, floating *gx,
                           floating *scratch, floating *tape) noexcept nogil:
    """Accumulate (with s.overwrite: set) the element's parameter gradients and write its input
    gradient to gx (NULL: not wanted). y is its output, d a writable m x n_out buffer that may
    alias y (both dead after). tape holds its internals if kept, else NULL and scratch has room
    for them."""
    if floating is float:
        _KIND_OPS[e.kind].backward_f(table, e, s, x, y, d, g, gx, scratch, tape)
    else:
        _KIND_OPS[e.kind].backward_d(table, e, s, x, y, d, g, gx, scratch, tape)


include "_chain_table.pxi"


cdef class Chain:
    """The compiled form of a chain: its element table, its flat parameter lists, and the
    executor of compiled schedules.

    Parameters are referenced, never copied: layers update them in place, so the pointers stay
    valid for the chain's life. ``ints`` / ``reals`` are the element table (columns
    ELEMENT_COLUMNS / ELEMENT_REALS); its first ``n_elements`` rows are the chain, the rest
    the bodies of Residual blocks. Every size is checked here, with the GIL, so that the
    executor can run without checks.
    """
    cdef readonly Py_ssize_t n_elements
    cdef readonly Py_ssize_t n_params
    cdef readonly Py_ssize_t max_width
    cdef readonly object dtype
    cdef bint is_double
    cdef bint busy          # a phase is running (in some thread)
    cdef Element *table
    cdef Py_ssize_t n_table
    cdef void **params
    cdef void **grads
    cdef Py_ssize_t *sizes
    cdef readonly Py_ssize_t parameter_size   # values in all parameters together
    cdef readonly Py_ssize_t max_dense_product  # largest n_in * n_out of a GEMM element (Dense)
    # Per slice (capacity max_slices): a[i], where activation i lives this step (NULL when not
    # held), and tapes[i], the internals kept beside it.
    cdef Slice *slices
    cdef void **tables      # 2 * (n_elements + 1) pointers per slice: its a, then its tapes
    cdef Py_ssize_t max_slices
    cdef readonly Py_ssize_t n_slices   # slices of the pending step (1: not split)
    cdef Py_ssize_t m_total
    cdef void *copy_data    # the gradient copies of slices 1 .. n_slices - 1
    cdef Py_ssize_t copy_values
    cdef bint grads_overlap # two gradients share memory: backward can only add into them
    cdef void **copy_ptrs   # (max_slices - 1) x n_params pointers into copy_data
    cdef ckpt_interrupt intr    # Ctrl-C during the running phase (see _interrupt.h)
    cdef list _keep

    def __cinit__(self, const int64_t[:, ::1] ints, const double[:, ::1] reals,
                  Py_ssize_t n_elements, list params, list grads):
        cdef Py_ssize_t n = ints.shape[0], i
        cdef Element *e
        if ints.shape[1] != len(ELEMENT_COLUMNS) or reals.shape[1] != len(ELEMENT_REALS):
            raise ValueError(f"the element table needs {len(ELEMENT_COLUMNS)} integer and "
                             f"{len(ELEMENT_REALS)} real columns")
        if reals.shape[0] != n or not 0 < n_elements <= n:
            raise ValueError(f"{n} integer rows, {reals.shape[0]} real rows, {n_elements} "
                             f"chain elements: inconsistent")
        if len(params) != len(grads):
            raise ValueError(f"{len(params)} parameters but {len(grads)} gradients")
        self.dtype = np.dtype(params[0].dtype) if params else None
        self.table = <Element *>PyMem_Malloc(n * sizeof(Element))
        self.params = <void **>PyMem_Malloc((len(params) + 1) * sizeof(void *))
        self.grads = <void **>PyMem_Malloc((len(params) + 1) * sizeof(void *))
        self.sizes = <Py_ssize_t *>PyMem_Malloc((len(params) + 1) * sizeof(Py_ssize_t))
        if (self.table == NULL or self.params == NULL or self.grads == NULL
                or self.sizes == NULL):
            raise MemoryError()
        self.n_table = n
        self.n_elements = n_elements
        self.n_params = len(params)
        _decode_table(self.table, ints, reals)
        self._check_params(params, grads)
        _check_table(self.table, self.n_table, self.n_elements, self.sizes, self.n_params)
        self.max_width = self.table[0].n_in
        for i in range(n_elements):
            self.max_width = max(self.max_width, self.table[i].n_out)
        self.max_dense_product = 0
        for i in range(n):
            if _KIND_OPS[self.table[i].kind].is_gemm:
                self.max_dense_product = max(self.max_dense_product,
                                             self.table[i].n_in * self.table[i].n_out)
        self.parameter_size = 0
        for i in range(self.n_params):
            self.parameter_size += self.sizes[i]
        self._reserve_slices(1)
        self.n_slices = 1
        self.busy = False

    def __dealloc__(self):
        PyMem_Free(self.table)
        PyMem_Free(self.params)
        PyMem_Free(self.grads)
        PyMem_Free(self.sizes)
        PyMem_Free(self.slices)
        PyMem_Free(self.tables)
        PyMem_Free(self.copy_data)
        PyMem_Free(self.copy_ptrs)

    cdef int _reserve_slices(self, Py_ssize_t n) except -1:
        """Room for n slices' tables (never shrinks; only between phases)."""
        cdef Py_ssize_t width = self.n_elements + 1, s
        cdef void *grown
        if n <= self.max_slices:
            return 0
        grown = PyMem_Realloc(self.slices, n * sizeof(Slice))
        if grown == NULL:
            raise MemoryError()
        self.slices = <Slice *>grown
        grown = PyMem_Realloc(self.tables, 2 * n * width * sizeof(void *))
        if grown == NULL:
            raise MemoryError()
        self.tables = <void **>grown
        memset(self.tables, 0, 2 * n * width * sizeof(void *))
        memset(self.slices, 0, n * sizeof(Slice))
        for s in range(n):
            self.slices[s].a = self.tables + 2 * s * width
            self.slices[s].tapes = self.tables + (2 * s + 1) * width
        self.max_slices = n
        return 0

    cdef int _reserve_copies(self, Py_ssize_t n) except -1:
        """Gradient copies for slices 1 .. n - 1 (kept across steps, never shrinks)."""
        cdef Py_ssize_t values = (n - 1) * self.parameter_size, s, i, at
        cdef Py_ssize_t itemsize = 8 if self.is_double else 4
        cdef void *grown
        if values > self.copy_values or self.copy_ptrs == NULL:
            grown = PyMem_Realloc(self.copy_data, max(values, 1) * itemsize)
            if grown == NULL:
                raise MemoryError()
            self.copy_data = grown
            self.copy_values = values
        grown = PyMem_Realloc(self.copy_ptrs, (max(n - 1, 1) * self.n_params + 1)
                              * sizeof(void *))
        if grown == NULL:
            raise MemoryError()
        self.copy_ptrs = <void **>grown
        at = 0
        for s in range(n - 1):
            for i in range(self.n_params):
                self.copy_ptrs[s * self.n_params + i] = \
                    <void *>(<char *>self.copy_data + at * itemsize)
                at += self.sizes[i]
        return 0

    cdef int _check_params(self, list params, list grads) except -1:
        cdef Py_ssize_t i
        for i in range(len(params)):
            p, g = params[i], grads[i]
            if not (isinstance(p, np.ndarray) and isinstance(g, np.ndarray)):
                raise TypeError(f"parameter {i} and its gradient must be numpy arrays")
            if p.dtype != self.dtype or g.dtype != self.dtype or p.dtype not in (np.float32,
                                                                                 np.float64):
                raise TypeError(f"parameter {i}: every parameter and gradient must be the same "
                                f"float32 or float64, got {p.dtype} and {g.dtype}")
            if p.shape != g.shape or not (p.flags.c_contiguous and g.flags.c_contiguous):
                raise ValueError(f"parameter {i}: gradient shape {g.shape} differs from "
                                 f"{p.shape}, or one is not C-contiguous")
            if not p.flags.writeable or not g.flags.writeable:
                raise ValueError(f"parameter {i} and its gradient must be writable")
            self.params[i] = <void *><Py_ssize_t>p.ctypes.data
            self.grads[i] = <void *><Py_ssize_t>g.ctypes.data
            self.sizes[i] = p.size
        self.is_double = self.dtype == np.float64
        self._keep = [list(params), list(grads)]
        self.grads_overlap = self._grads_overlap()
        return 0

    cdef bint _grads_overlap(self) except -1:
        """Whether two gradients share memory (sorting their spans in C: Python tuples would
        stay in the interpreter's free lists, which the memory tests count)."""
        cdef Py_ssize_t i, n = self.n_params, itemsize = 8 if self.is_double else 4
        cdef _Span *spans = <_Span *>PyMem_Malloc(max(n, 1) * sizeof(_Span))
        cdef bint overlap = False
        if spans == NULL:
            raise MemoryError()
        for i in range(n):
            spans[i].start = <char *>self.grads[i]
            spans[i].end = <char *>self.grads[i] + self.sizes[i] * itemsize
        qsort(spans, n, sizeof(_Span), _compare_spans)
        for i in range(n - 1):
            if spans[i + 1].start < spans[i].end:
                overlap = True
        PyMem_Free(spans)
        return overlap

    cdef int _enter(self) except -1:
        if self.busy:
            raise RuntimeError("this chain is running a phase in another thread")
        self.busy = True
        return 0

    def run_forward(self, const int64_t[:, ::1] rows, x, y, arena,
                    AtomicCounters counters=None, uint64_t seed=0, int64_t row0=0,
                    bint training=True, Py_ssize_t slices=1):
        """Hold x as a[0], then run the forward phase of a schedule; a[N] is written into y.

        ``seed`` keys the step's Dropout masks with ``row0``, the global index of x's first row.
        ``slices`` > 1 splits the batch into that many contiguous slices of rows (at most one
        per row), each run on its own thread of ckpt's pool with single-threaded BLAS; the
        backward phase uses the same split. The arena is shared by rows: slice s, starting at
        row r, uses the arena from (arena size / batch) * r on.
        """
        cdef Py_ssize_t m = x.shape[0] if x.ndim == 2 else 0, status, n, k, start, room
        cdef Py_ssize_t n_in = self.table[0].n_in
        cdef Py_ssize_t n_out = self.table[self.n_elements - 1].n_out
        cdef Py_ssize_t itemsize = 8 if self.is_double else 4
        cdef ckpt_counters *c = &counters.c if counters is not None else NULL
        cdef Slice *sl
        for arr, width, name in ((x, n_in, "x"), (y, n_out, "y")):
            if arr.dtype != self.dtype or not arr.flags.c_contiguous or arr.shape != (m, width):
                raise ValueError(f"{name} must be a C-contiguous {self.dtype} array of shape "
                                 f"({m}, {width}), got {arr.dtype} {arr.shape}")
        if not y.flags.writeable:
            raise ValueError("y must be writable")
        self._check_arena(arena)
        _check_rows(self.table, self.n_elements, rows, m, arena.shape[0])
        _check_blas_dim(m, "batch size")
        if row0 < 0:
            raise ValueError(f"row0 must be non-negative, got {row0}")
        if slices < 1:
            raise ValueError(f"slices must be at least 1, got {slices}")
        n = max(1, min(slices, m))
        self._enter()
        try:
            self._reserve_slices(n)
        except MemoryError:
            self.busy = False
            raise
        room = arena.shape[0] // m if m > 0 else 0
        cdef char *x_ptr = <char *><Py_ssize_t>x.ctypes.data
        cdef char *y_ptr = <char *><Py_ssize_t>y.ctypes.data
        cdef char *arena_ptr = <char *><Py_ssize_t>arena.ctypes.data
        for k in range(n):
            start = k * m // n
            sl = &self.slices[k]
            memset(sl.a, 0, (self.n_elements + 1) * sizeof(void *))
            memset(sl.tapes, 0, (self.n_elements + 1) * sizeof(void *))
            sl.step.m = (k + 1) * m // n - start
            sl.step.row0 = row0 + start
            sl.step.seed = seed
            sl.step.training = training
            sl.step.params = self.params
            sl.step.grads = self.grads
            sl.a[0] = x_ptr + start * n_in * itemsize
            sl.output = y_ptr + start * n_out * itemsize
            sl.arena = arena_ptr + start * room * itemsize
            sl.grad_output = NULL
            sl.buf0 = sl.buf1 = sl.grad_input = NULL
            sl.c = c if k == 0 else NULL
            sl.count_rows = m
            sl.status = -1
        self.n_slices = n
        self.m_total = m
        if c != NULL:
            ckpt_record_stored(c, x.nbytes)
        status = self._dispatch(rows, False)
        self.busy = False
        if status == INTERRUPTED:
            self._raise_interrupt()
        if status >= 0:
            raise ValueError(f"schedule row {status} uses an activation that is not held")

    def run_backward(self, const int64_t[:, ::1] rows, grad_output, arena, grad_buffers,
                     grad_input, AtomicCounters counters=None, bint accumulate=True):
        """Run the backward phase of a schedule, from grad_output (of a[N]) to grad_input (of
        a[0]; None when not wanted). grad_buffers holds at least 2 * batch * max_width values.

        The parameter gradients are added to (accumulate) or set to this backward's (not
        accumulate: the values zero_grad() then a backward would give, without reading or
        zeroing the old ones -- every parameter belongs to one element, whose backward runs
        once a phase).

        A split step (see run_forward) runs each slice's backward on its own thread: slice 0
        accumulates into (or sets) the real gradients, slice s >= 1 sets its own copy; then
        every gradient value g is reduced as ((g + slice 0) + slice 1) + ... + slice T-1, in
        that order, whatever the timing (the reduction is itself split across the pool by value
        ranges, each value summed by one thread in that order). The copies are counted as
        gradient bytes in the tracker while the backward runs.
        """
        cdef Py_ssize_t m = self.m_total, status, n = self.n_slices, k, start
        cdef Py_ssize_t n_in = self.table[0].n_in
        cdef Py_ssize_t n_out = self.table[self.n_elements - 1].n_out
        cdef Py_ssize_t w = self.max_width
        cdef Py_ssize_t itemsize = 8 if self.is_double else 4
        cdef ckpt_counters *c = &counters.c if counters is not None else NULL
        cdef Slice *sl
        if (grad_output.dtype != self.dtype or not grad_output.flags.c_contiguous
                or grad_output.shape != (m, n_out)):
            raise ValueError(f"grad_output must be a C-contiguous {self.dtype} array of shape "
                             f"({m}, {n_out}), got {grad_output.dtype} {grad_output.shape}")
        if (grad_buffers.dtype != self.dtype or grad_buffers.ndim != 1
                or not grad_buffers.flags.c_contiguous
                or grad_buffers.shape[0] < 2 * m * w):
            raise ValueError(f"grad_buffers must hold {2 * m * w} {self.dtype} values")
        if grad_input is not None and (grad_input.dtype != self.dtype
                                       or not grad_input.flags.c_contiguous
                                       or grad_input.shape != (m, n_in)):
            raise ValueError(f"grad_input must be a C-contiguous {self.dtype} array of shape "
                             f"({m}, {n_in})")
        self._check_arena(arena)
        _check_rows(self.table, self.n_elements, rows, m, arena.shape[0])
        if n > 1:
            self._reserve_copies(n)
        self._enter()
        if not accumulate and self.grads_overlap:   # a shared gradient takes two elements' sums
            self.zero_grad()
            accumulate = True
        cdef char *g_ptr = <char *><Py_ssize_t>grad_output.ctypes.data
        cdef char *buf_ptr = <char *><Py_ssize_t>grad_buffers.ctypes.data
        cdef char *gin = NULL
        cdef int64_t grad_bytes = 2 * m * w * itemsize
        cdef int64_t copy_bytes = (n - 1) * self.parameter_size * itemsize
        if grad_input is not None:
            gin = <char *><Py_ssize_t>grad_input.ctypes.data
        for k in range(n):
            start = k * m // n
            sl = &self.slices[k]
            sl.grad_output = g_ptr + start * n_out * itemsize
            sl.buf0 = buf_ptr + 2 * start * w * itemsize
            sl.buf1 = <char *>sl.buf0 + sl.step.m * w * itemsize
            sl.grad_input = gin + start * n_in * itemsize if gin != NULL else NULL
            sl.step.grads = self.grads if k == 0 else self.copy_ptrs + (k - 1) * self.n_params
            sl.step.overwrite = k > 0 or not accumulate
            sl.status = -1
        if c != NULL:
            ckpt_record_gradient(c, grad_bytes + copy_bytes)
        status = self._dispatch(rows, True)
        if c != NULL:
            ckpt_release_gradient(c, grad_bytes + copy_bytes)
        self.busy = False
        if status == INTERRUPTED:
            self._raise_interrupt()
        if status >= 0:
            raise ValueError(f"schedule row {status} uses an activation that is not held")

    cdef Py_ssize_t _dispatch(self, const int64_t[:, ::1] rows, bint backward) noexcept:
        """Run one phase over the slices (in the pool when split), then, after a split
        backward, reduce the gradient copies. Returns -1, the first failing row, or INTERRUPTED
        (a signal handler raised: the phase stopped between rows, what it held is released
        from the tracker, and no reduction ran)."""
        cdef Job job
        cdef Py_ssize_t k, status = -1
        ckpt_interrupt_begin(&self.intr, PyThread_get_thread_ident() == _MAIN_THREAD)
        for k in range(self.n_slices):
            self.slices[k].intr = &self.intr
        job.table = self.table
        job.n_elements = self.n_elements
        job.rows = &rows[0, 0] if rows.shape[0] > 0 else NULL
        job.n_rows = rows.shape[0]
        job.slices = self.slices
        job.n_slices = self.n_slices
        job.is_double = self.is_double
        job.backward = backward
        job.grads = self.grads
        job.copies = self.copy_ptrs
        job.sizes = self.sizes
        job.n_params = self.n_params
        job.total = self.parameter_size
        with nogil:
            if job.n_slices == 1:
                _phase_task(&job, 0)
            else:
                ckpt_pool_run(<int>job.n_slices, _phase_task, &job)
                if backward and not ckpt_interrupt_stopped(&self.intr):
                    ckpt_pool_run(<int>job.n_slices, _reduce_task, &job)
        if ckpt_interrupt_stopped(&self.intr):
            self._release_held()
            return INTERRUPTED
        for k in range(self.n_slices):
            if self.slices[k].status >= 0:
                status = self.slices[k].status
                break
        return status

    cdef void _release_held(self) noexcept:
        """After a stopped phase: take every activation (and tape) slice 0 still holds out of
        the tracker -- the step is dropped -- and forget where they were."""
        cdef Slice *sl = &self.slices[0]
        cdef Py_ssize_t i, k
        cdef int64_t unit = sl.count_rows * (8 if self.is_double else 4)
        if sl.c != NULL:
            for i in range(self.n_elements + 1):
                if sl.a[i] != NULL:
                    ckpt_release_stored(sl.c, unit * _held_units(self.table, sl.tapes, i))
        for k in range(self.n_slices):
            memset(self.slices[k].a, 0, (self.n_elements + 1) * sizeof(void *))
            memset(self.slices[k].tapes, 0, (self.n_elements + 1) * sizeof(void *))

    cdef int _raise_interrupt(self) except -1:
        """Raise what the signal handler raised during the phase (KeyboardInterrupt)."""
        PyErr_Restore(<PyObject *>self.intr.exc_type, <PyObject *>self.intr.exc_value,
                      <PyObject *>self.intr.exc_traceback)
        self.intr.exc_type = self.intr.exc_value = self.intr.exc_traceback = NULL
        return -1

    cdef int _check_arena(self, arena) except -1:
        if (not isinstance(arena, np.ndarray) or arena.dtype != self.dtype or arena.ndim != 1
                or not arena.flags.c_contiguous or not arena.flags.writeable):
            raise ValueError(f"the arena must be a writable 1-D C-contiguous {self.dtype} array")
        return 0

    cdef int _elementwise_job(self, Job *job, double lr) noexcept:
        """A job over all parameter values, cut into equal ranges: T of them (T =
        get_num_threads()) when the last step was split and there are at least
        ELEMENTWISE_PARALLEL_MIN values per thread, else one. Elementwise work gives the same
        values however it is cut.

        After an unsplit ("blas") step OpenBLAS's own threads are still spinning on the other
        cores; waking ckpt's pool there made the two fight for them (the medium benchmark's
        step was 17-25% slower than the DenseChain build before the per-element executor)."""
        cdef int threads = 1
        if self.n_slices > 1:
            threads = ckpt_pool_blas_threads()
            if threads <= 0:
                threads = scipy_openblas_get_num_threads()
        job.n_slices = max(1, min(threads, self.parameter_size // ELEMENTWISE_PARALLEL_MIN))
        job.is_double = self.is_double
        job.grads = self.grads
        job.params = self.params
        job.sizes = self.sizes
        job.n_params = self.n_params
        job.total = self.parameter_size
        job.lr = lr
        return 0

    def sgd_update(self, double learning_rate):
        """p -= lr * grad for every parameter of the chain, in one call (split across ckpt's
        pool when the parameters are large; the values do not depend on the split)."""
        cdef Job job
        self._elementwise_job(&job, learning_rate)
        with nogil:
            if job.n_slices == 1:
                _update_task(&job, 0)
            else:
                ckpt_pool_run(<int>job.n_slices, _update_task, &job)

    def zero_grad(self):
        """Set every gradient of the chain to zero, in one call (split like sgd_update)."""
        cdef Job job
        self._elementwise_job(&job, 0.0)
        with nogil:
            if job.n_slices == 1:
                _zero_task(&job, 0)
            else:
                ckpt_pool_run(<int>job.n_slices, _zero_task, &job)

    @property
    def elementwise_slices(self):
        """Ranges sgd_update and zero_grad are cut into now (1: not parallel)."""
        cdef Job job
        self._elementwise_job(&job, 0.0)
        return job.n_slices


cdef void _phase_task(void *arg, int index) noexcept nogil:
    """Pool task: run one slice's phase (in backward, slice s >= 1 sets its gradient copy)."""
    cdef Job *job = <Job *>arg
    cdef Slice *sl = &job.slices[index]
    if job.is_double:
        sl.status = _run(job.table, job.n_elements, job.rows, job.n_rows, sl,
                         <double *>sl.arena)
    else:
        sl.status = _run(job.table, job.n_elements, job.rows, job.n_rows, sl,
                         <float *>sl.arena)


cdef void _reduce_task(void *arg, int index) noexcept nogil:
    """Pool task: for the index-th of n_slices equal ranges of all the gradient values (in the
    order of the parameters), add the copies of slices 1, 2, ... into the real gradients, in
    that order."""
    cdef Job *job = <Job *>arg
    cdef Py_ssize_t lo = index * job.total // job.n_slices
    cdef Py_ssize_t hi = (index + 1) * job.total // job.n_slices
    cdef Py_ssize_t i, s, at = 0, a, b
    for i in range(job.n_params):
        a = max(lo, at) - at
        b = min(hi, at + job.sizes[i]) - at
        if a < b:
            for s in range(1, job.n_slices):
                if job.is_double:
                    _add_into(<double *>job.grads[i] + a,
                              <const double *>job.copies[(s - 1) * job.n_params + i] + a, b - a)
                else:
                    _add_into(<float *>job.grads[i] + a,
                              <const float *>job.copies[(s - 1) * job.n_params + i] + a, b - a)
        at += job.sizes[i]


# Parameter values per thread below which sgd_update / zero_grad stay on one thread: at 128 Ki
# (the small benchmark workload, 256 Ki values) waking the pool cost more than it saved.
cdef Py_ssize_t ELEMENTWISE_PARALLEL_MIN = 1 << 20


cdef void _update_task(void *arg, int index) noexcept nogil:
    """Pool task: p -= lr * grad over the index-th of n_slices equal ranges of the values."""
    cdef Job *job = <Job *>arg
    cdef Py_ssize_t lo = index * job.total // job.n_slices
    cdef Py_ssize_t hi = (index + 1) * job.total // job.n_slices
    cdef Py_ssize_t i, at = 0, a, b
    for i in range(job.n_params):
        a = max(lo, at) - at
        b = min(hi, at + job.sizes[i]) - at
        if a < b:
            if job.is_double:
                sgd_step_ptr(<double *>job.params[i] + a, <const double *>job.grads[i] + a,
                             b - a, job.lr)
            else:
                sgd_step_ptr(<float *>job.params[i] + a, <const float *>job.grads[i] + a,
                             b - a, <float>job.lr)
        at += job.sizes[i]


cdef void _zero_task(void *arg, int index) noexcept nogil:
    """Pool task: zero the index-th of n_slices equal ranges of the gradient values."""
    cdef Job *job = <Job *>arg
    cdef Py_ssize_t lo = index * job.total // job.n_slices
    cdef Py_ssize_t hi = (index + 1) * job.total // job.n_slices
    cdef Py_ssize_t i, at = 0, a, b, itemsize = 8 if job.is_double else 4
    for i in range(job.n_params):
        a = max(lo, at) - at
        b = min(hi, at + job.sizes[i]) - at
        if a < b:
            memset(<char *>job.grads[i] + a * itemsize, 0, (b - a) * itemsize)
        at += job.sizes[i]


cdef inline void _add_into(floating *dst, const floating *src, Py_ssize_t n) noexcept nogil:
    """dst += src"""
    cdef Py_ssize_t j
    for j in range(n):
        dst[j] += src[j]


cdef Py_ssize_t _run(const Element *table, Py_ssize_t n_elements, const int64_t *rows,
                     Py_ssize_t n_rows, Slice *sl, floating *arena) noexcept nogil:
    """Run the rows of a compiled schedule over one slice; returns -1, or the first row that
    found an activation it needs not held (the rows were bounds-checked, not replayed).

    Only the slice holding the tracker (slice 0) records, each event for the whole batch
    (count_rows): every slice runs the same rows, so the figures are those of all slices in
    lock step -- the most any timing of the slices can hold at once.
    """
    cdef Step *s = &sl.step
    cdef Py_ssize_t r, op, i, m = s.m, last = n_elements - 1
    cdef const Element *e
    cdef const int64_t *row
    cdef floating *dst
    cdef floating *tape
    cdef floating *scratch
    cdef floating *d
    cdef floating *gx
    cdef floating *spare
    cdef floating *buf0 = <floating *>sl.buf0
    cdef floating *buf1 = <floating *>sl.buf1
    cdef const floating *g = <const floating *>sl.grad_output
    cdef ckpt_counters *c = sl.c
    cdef void **a = sl.a
    cdef void **tapes = sl.tapes
    cdef int64_t held, transient, unit = sl.count_rows * sizeof(floating)
    for r in range(n_rows):
        if _interrupted(sl.intr):
            return INTERRUPTED
        row = rows + 6 * r
        op, i = row[0], row[1]
        if op == OP_FREE:
            if a[i] != NULL and c != NULL:
                ckpt_release_stored(c, unit * _held_units(table, tapes, i))
            a[i] = NULL
            tapes[i] = NULL
            continue
        e = table + i
        scratch = arena + m * row[5] if row[5] >= 0 else NULL
        tape = arena + m * row[4] if row[4] >= 0 else NULL
        if op == OP_FORWARD:
            if a[i] == NULL or a[i + 1] != NULL:
                return r
            dst = <floating *>sl.output if row[2] < 0 else arena + m * row[2]
            a[i + 1] = dst
            tapes[i + 1] = tape
            held = unit * (e.n_out + (e.tape if tape != NULL else 0))
            transient = unit * e.fwd_scratch
            if c != NULL:
                ckpt_record_stored(c, held + transient)
                if row[3]:
                    ckpt_record_recomputed(c, held)
            _forward(table, e, s, <floating *>a[i], dst, scratch, tape)
            if c != NULL and transient:
                ckpt_release_stored(c, transient)
        else:
            if (g == NULL or a[i] == NULL or a[i + 1] == NULL
                    or (tape != NULL) != (tapes[i + 1] != NULL)):
                return r
            spare = buf1 if g == buf0 else buf0
            # Element i's output is dead after its backward: it becomes the delta, except the
            # network output, which belongs to the caller: then the spare buffer serves.
            if i == last:
                d = spare
                spare = buf1 if d == buf0 else buf0
            else:
                d = <floating *>a[i + 1]
            gx = <floating *>sl.grad_input if i == 0 else spare
            transient = unit * (e.bwd_scratch + (0 if tape != NULL else e.tape))
            if c != NULL and transient:
                ckpt_record_stored(c, transient)
                if tape == NULL and e.tape:     # the internals are rebuilt: recomputed too
                    ckpt_record_recomputed(c, unit * e.tape)
            _backward(table, e, s, <floating *>a[i], <floating *>a[i + 1], d,
                      g, gx, scratch, <floating *>tapes[i + 1])
            if c != NULL:
                ckpt_release_stored(c, transient + unit * _held_units(table, tapes, i + 1))
            g = gx
            a[i + 1] = NULL
            tapes[i + 1] = NULL
    return -1


cdef inline bint _interrupted(ckpt_interrupt *it) noexcept nogil:
    """True when the phase must stop: a signal handler raised, now (polled here) or earlier
    (seen by another slice)."""
    if ckpt_interrupt_stopped(it):
        return True
    if ckpt_interrupt_due(it):
        with gil:
            if _check_signals() != 0:
                PyErr_Fetch(<PyObject **>&it.exc_type, <PyObject **>&it.exc_value,
                            <PyObject **>&it.exc_traceback)
                ckpt_interrupt_set(it)
        return ckpt_interrupt_stopped(it)
    return False


cdef inline Py_ssize_t _held_units(const Element *table, void **tapes,
                                   Py_ssize_t i) noexcept nogil:
    """Elements per row held for a[i]: its width, plus its element's tape when kept."""
    if i == 0:
        return table[0].n_in
    return table[i - 1].n_out + (table[i - 1].tape if tapes[i] != NULL else 0)
