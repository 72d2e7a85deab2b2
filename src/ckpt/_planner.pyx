# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The recursion Z / C of ``ckpt.plan`` on exact memory counts: what the planner runs.

The maths, the decision codes and the tie-breaking are those of the ``ckpt.plan`` docstring and
of its Python oracle ``ckpt.plan._oracle._Recursion`` (the tests' reference, never a fallback),
line by line, so both return the same schedules. Each state keeps its optima
as disjoint intervals [peak, m] sorted by peak, plus the largest m known to be infeasible; a
lookup tries the interval that answered last (budgets come back in bursts), then bisects. The
states (y, p, ., .) get their memo when (y, p) is first reached.
"""
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memmove

import numpy as np

from ckpt.schedule import BACKWARD, FORWARD, FREE

cdef int64_t INF = 0x7FFFFFFFFFFFFFFF
cdef int64_t NEG = -INF - 1
cdef int32_t TERMINAL = 0, FREE_END = -1  # a push to r2 is r2 >= 1, a slide to y2 is -y2


cdef struct Entry:
    int64_t lo, hi, cost, peak
    int32_t dec


cdef struct Memo:
    Entry* items            # sorted by lo
    int32_t size, cap, last # last: the entry that answered the previous lookup
    int64_t dead            # no schedule for any m <= dead


cdef struct Res:
    int64_t cost, peak
    int32_t dec


cdef inline Res res_of(int64_t cost, int64_t peak, int32_t dec) noexcept:
    cdef Res res
    res.cost, res.peak, res.dec = cost, peak, dec
    return res


cdef inline int64_t max64(int64_t a, int64_t b) noexcept:
    return a if a > b else b


cdef inline int32_t covering(Entry* items, int32_t size, int64_t m) noexcept:
    """How many entries start at or below m (the last of them is the only one that can hold m)."""
    cdef int32_t low = 0, high = size, mid
    while low < high:
        mid = (low + high) >> 1
        if items[mid].lo <= m:
            low = mid + 1
        else:
            high = mid
    return low


cdef class Recursion:
    """Z and C for one chain, memoised across budgets: per activation its size, per element its
    forward FLOPs, forward scratch and backward scratch (any one unit of memory, FLOPs in any
    one unit).

    ``slides=False`` restricts to persistent schedules (the rotor recursion). ``limit`` >= 0
    bounds the work: after that many evaluations of Z or C the search stops, ``finished`` turns
    False and no result of this object may be used. ``allowed`` (one flag per activation),
    when given, restricts what a segment longer than ``window`` elements may store or slide to:
    only activations whose flag is set (a bounded search for long chains).
    """

    cdef int n, window
    cdef bint slides, out_of_memory, aborted, restricted
    cdef signed char[::1] allowed
    cdef int64_t limit, n_calls
    cdef int64_t[::1] w, pre, bwd
    cdef int64_t[:, ::1] keep, drop
    cdef Memo** rows_z
    cdef Memo** rows_c
    cdef list forward_ops, backward_ops, free_ops

    def __cinit__(self):
        self.rows_z = self.rows_c = NULL

    def __init__(self, const int64_t[::1] sizes, const int64_t[::1] flops,
                 const int64_t[::1] forward_scratch, const int64_t[::1] backward_scratch,
                 bint slides, int64_t limit=-1, allowed=None, int window=0):
        cdef int n = sizes.shape[0] - 1
        cdef int x, j
        cdef int64_t a, b, pair
        if n < 1 or flops.shape[0] != n or forward_scratch.shape[0] != n \
                or backward_scratch.shape[0] != n:
            raise ValueError(
                f"need N+1 sizes and N flops and scratches, got {sizes.shape[0]}, "
                f"{flops.shape[0]}, {forward_scratch.shape[0]} and {backward_scratch.shape[0]}")
        self.n, self.slides, self.limit, self.n_calls, self.aborted = n, slides, limit, 0, False
        self.restricted, self.window = allowed is not None, window
        self.allowed = np.ones(n + 1, dtype=np.int8) if allowed is None \
            else np.array(allowed, dtype=np.int8).reshape(-1)
        if self.allowed.shape[0] != n + 1:
            raise ValueError(f"need N+1 = {n + 1} flags in allowed, got {self.allowed.shape[0]}")
        self.w = np.array(sizes, dtype=np.int64)
        self.bwd = np.array(backward_scratch, dtype=np.int64)
        self.pre = np.zeros(n + 1, dtype=np.int64)
        for x in range(n):
            self.pre[x + 1] = self.pre[x] + flops[x]
        # keep[x, j] / drop[x, j]: peak of the sweep a_x -> a_j holding a_x throughout / freeing
        # it; the forward of a_k holds a_k, a_(k+1) and its scratch (and a_x when kept).
        self.keep = np.zeros((n + 1, n + 1), dtype=np.int64)
        self.drop = np.zeros((n + 1, n + 1), dtype=np.int64)
        for x in range(n):
            a = b = sizes[x] + sizes[x + 1] + forward_scratch[x]
            self.keep[x, x + 1] = a
            self.drop[x, x + 1] = b
            for j in range(x + 2, n + 1):
                pair = sizes[j - 1] + sizes[j] + forward_scratch[j - 1]
                a = max64(a, sizes[x] + pair)
                b = max64(b, pair)
                self.keep[x, j] = a
                self.drop[x, j] = b
        # State (y, p, r, e) -> rows[y, p][(r - y) * 2 + e]; with slides r runs over [y, p),
        # and a child (y, p, r2, e) has the same place with r2 in (y, p). Without slides r = y.
        self.rows_z = <Memo**> calloc((n + 1) * (n + 1), sizeof(Memo*))
        if slides:
            self.rows_c = <Memo**> calloc((n + 1) * (n + 1), sizeof(Memo*))
        if self.rows_z == NULL or (slides and self.rows_c == NULL):
            raise MemoryError(f"no room for the memo of a {n}-layer chain")
        self.out_of_memory = False
        self.forward_ops = [(FORWARD, i) for i in range(n)]
        self.backward_ops = [(BACKWARD, i) for i in range(n)]
        self.free_ops = [(FREE, i) for i in range(n + 1)]

    @property
    def finished(self) -> bool:
        """False once the work limit stopped a search (then nothing here may be used)."""
        return not self.aborted

    @property
    def calls(self) -> int:
        """Evaluations of Z and C so far (what ``limit`` bounds)."""
        return self.n_calls

    cdef inline bint over(self) noexcept:
        """Count one evaluation; True when the search must stop."""
        if self.aborted:
            return True
        self.n_calls += 1
        if 0 <= self.limit < self.n_calls:
            self.aborted = True
        return self.aborted

    def __dealloc__(self):
        self.free_rows(self.rows_z)
        self.free_rows(self.rows_c)

    cdef void free_rows(self, Memo** table) noexcept:
        cdef int y, p, i
        cdef Memo* row
        if table == NULL:
            return
        for p in range(1, self.n + 1):
            for y in range(p):
                row = table[y * (self.n + 1) + p]
                if row != NULL:
                    for i in range(self.length(y, p)):
                        free(row[i].items)
                    free(row)
        free(table)

    cdef inline int length(self, int y, int p) noexcept:
        """States per (y, p): r (or r2) in [y, p) and e in {0, 1}; just r = y without slides."""
        return 2 * (p - y) if self.slides else 2

    cdef Memo* memo(self, Memo** table, int y, int p, int slot) noexcept:
        """The memo of one state of (y, p), created empty with its row (NULL if out of memory)."""
        cdef Py_ssize_t k = y * (self.n + 1) + p
        cdef int i
        if table[k] == NULL:
            table[k] = <Memo*> calloc(self.length(y, p), sizeof(Memo))
            if table[k] == NULL:
                self.out_of_memory = True
                return NULL
            for i in range(self.length(y, p)):
                table[k][i].dead = NEG
        return &table[k][slot]

    cdef inline bint recall(self, Memo* memo, int64_t m, Res* out) noexcept:
        cdef Entry* items = memo.items
        cdef int32_t k = memo.last
        if m <= memo.dead:
            out[0] = res_of(INF, INF, 0)
            return True
        if not (k < memo.size and items[k].lo <= m <= items[k].hi):
            k = covering(items, memo.size, m) - 1
            if k < 0 or m > items[k].hi:
                return False
            memo.last = k
        out[0] = res_of(items[k].cost, items[k].peak, items[k].dec)
        return True

    cdef void remember(self, Memo* memo, int64_t m, Res res) noexcept:
        cdef Entry* grown
        cdef int32_t k
        if res.cost == INF:
            if memo.dead < m:
                memo.dead = m
            return
        k = covering(memo.items, memo.size, m)
        # Optima only improve with m, so an equal one can only be the entry just below.
        if k > 0 and memo.items[k - 1].cost == res.cost and memo.items[k - 1].peak == res.peak:
            if memo.items[k - 1].hi < m:
                memo.items[k - 1].hi = m
            return
        if memo.size == memo.cap:
            grown = <Entry*> realloc(memo.items, (2 * memo.cap + 2) * sizeof(Entry))
            if grown == NULL:  # go on without this entry; value() raises MemoryError after
                self.out_of_memory = True
                return
            memo.items, memo.cap = grown, 2 * memo.cap + 2
        memmove(&memo.items[k + 1], &memo.items[k], (memo.size - k) * sizeof(Entry))
        memo.items[k].lo, memo.items[k].hi, memo.items[k].cost = res.peak, m, res.cost
        memo.items[k].peak, memo.items[k].dec = res.peak, res.dec
        memo.size += 1
        memo.last = k

    cdef Res z(self, int y, int p, int r, int e, int64_t m) noexcept:
        cdef int64_t own = self.w[y] + (self.w[p] if e else 0)
        cdef int64_t best, best_peak, cost, peak, sweep, extra, floor
        cdef int32_t best_dec
        cdef Memo* memo
        cdef int r2, y2, last
        cdef bint free_choice = not self.restricted or p - y <= 2 * self.window
        cdef Res res, c1, c2
        if self.over() or own > m:
            return res_of(INF, INF, 0)
        memo = self.memo(self.rows_z, y, p, (r - y) * 2 + e)
        if memo == NULL:
            return res_of(INF, INF, 0)
        if self.recall(memo, m, &res):
            return res
        if y == p - 1:
            if r != y:
                res = res_of(INF, INF, 0)
            elif e:  # backward y
                peak = own + self.bwd[y]
                res = res_of(0, peak, TERMINAL) if peak <= m else res_of(INF, INF, 0)
            else:    # forward y, then backward y
                peak = max64(self.drop[y, p], own + self.w[p] + self.bwd[y])
                if peak <= m:
                    res = res_of(self.pre[p] - self.pre[y], peak, TERMINAL)
                else:
                    res = res_of(INF, INF, 0)
        else:
            best, best_peak, best_dec = INF, INF, 0
            if e:
                c2 = self.z(y, p, r, 0, m)
                if c2.cost != INF:
                    best, best_peak, best_dec = c2.cost, max64(c2.peak, own), FREE_END
            floor = (self.pre[p - 1] if e else self.pre[p]) - 2 * self.pre[y]
            for r2 in range(r + 1, p):
                if best != INF and floor + self.pre[r2 - 1] > best:
                    break
                if not (free_choice or self.allowed[r2] or r2 - y <= self.window):
                    continue
                c1 = self.child(y, p, r2, e, m)
                if c1.cost == INF or c1.cost > best:
                    continue
                c2 = self.z(y, r2, r, 1, m)
                if c2.cost == INF:
                    continue
                cost, peak = c1.cost + c2.cost, max64(c1.peak, c2.peak)
                if cost < best or (cost == best and peak < best_peak):
                    best, best_peak, best_dec = cost, peak, r2
            if self.slides and y > 0:
                extra = self.w[p] if e else 0
                last = r if r < p - 1 else p - 1
                for y2 in range(y + 1, last + 1):
                    sweep = self.drop[y, y2] + extra
                    if sweep > m:
                        break
                    if not (free_choice or self.allowed[y2] or y2 - y <= self.window):
                        continue
                    c2 = self.z(y2, p, r, e, m)
                    if c2.cost == INF:
                        continue
                    cost = self.pre[y2] - self.pre[y] + c2.cost
                    peak = max64(sweep, c2.peak)
                    if cost < best or (cost == best and peak < best_peak):
                        best, best_peak, best_dec = cost, peak, -y2
            res = res_of(best, best_peak, best_dec)
        if not self.aborted:
            self.remember(memo, m, res)
        return res

    cdef Res child(self, int y, int p, int r2, int e, int64_t m) noexcept:
        cdef int64_t extra = self.w[p] if e else 0
        cdef int64_t wy = self.w[y]
        cdef int64_t best = INF, best_peak = INF, cost, peak, sweep
        cdef int32_t best_b = 0
        cdef Memo* memo = NULL
        cdef int b
        cdef bint free_choice = not self.restricted or p - y <= 2 * self.window
        cdef Res res, c2
        if self.over():
            return res_of(INF, INF, 0)
        if self.slides:
            memo = self.memo(self.rows_c, y, p, (r2 - y) * 2 + e)
            if memo == NULL:
                return res_of(INF, INF, 0)
            if self.recall(memo, m, &res):
                return res
        for b in range(y + 1 if self.slides else r2, r2 + 1):
            sweep = self.keep[y, b] + extra
            if sweep > m:
                break
            if b < r2 and not (free_choice or self.allowed[b] or b - y <= self.window):
                continue
            c2 = self.z(b, p, r2, e, m - wy)
            if c2.cost == INF:
                continue
            cost = self.pre[b] - self.pre[y] + c2.cost
            peak = max64(sweep, c2.peak + wy)
            if cost < best or (cost == best and peak < best_peak):
                best, best_peak, best_b = cost, peak, b
        res = res_of(best, best_peak, best_b)
        if self.slides and not self.aborted:
            self.remember(memo, m, res)
        return res

    cdef Res top(self, int64_t budget) except *:
        cdef Res res = self.z(0, self.n, 0, 0, budget)
        if self.out_of_memory:
            raise MemoryError("the planner's memo outgrew the available memory")
        if self.aborted:
            raise RuntimeError("the search stopped at its work limit: its results are void")
        return res

    def value(self, int64_t budget):
        """(total forward FLOPs, peak) of the best schedule within budget, or None. Raises
        RuntimeError when the work limit stops the search (then ``finished`` is False)."""
        cdef Res res = self.top(budget)
        return None if res.cost == INF else (res.cost, res.peak)

    cdef void sweep(self, list out, int x, int j, bint keep):
        cdef int k
        for k in range(x, j):
            out.append(self.forward_ops[k])
            if k > x or not keep:
                out.append(self.free_ops[k])

    def ops(self, int64_t budget):
        """The schedule behind value(budget), which must not be None."""
        cdef list out = [], stack = [(1, 0, self.n, 0, 0, budget)]
        cdef int kind, y, p, r, e, b
        cdef int32_t dec
        cdef int64_t m
        self.top(budget)
        while stack:
            kind, y, p, r, e, m = stack.pop()
            if kind == 2:
                b = self.child(y, p, r, e, m).dec
                self.sweep(out, y, b, True)
                stack.append((1, b, p, r, e, m - self.w[y]))
                continue
            dec = self.z(y, p, r, e, m).dec
            if dec == TERMINAL:
                if not e:
                    out.append(self.forward_ops[y])
                out.append(self.backward_ops[y])
            elif dec == FREE_END:
                out.append(self.free_ops[p])
                stack.append((1, y, p, r, 0, m))
            elif dec > 0:
                stack.append((1, y, dec, r, 1, m))
                stack.append((2, y, p, dec, e, m))
            else:
                self.sweep(out, y, -dec, False)
                stack.append((1, -dec, p, r, e, m))
        return out
