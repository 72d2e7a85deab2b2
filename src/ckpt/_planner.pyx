# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``ckpt.plan._Recursion``: the recursion Z / C on exact byte counts.

The maths, the decision codes and the tie-breaking are those of ``ckpt.plan`` (module docstring
and ``_Recursion``), line by line, so both return the same schedules. Memo entries live in one
pool; each state keeps a linked list of intervals [peak, m] over which its optimum holds. The
list heads of the states (y, p, ., .) are allocated when (y, p) is first reached.
"""
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport calloc, free, malloc, realloc

import numpy as np

cdef int64_t INF = 0x7FFFFFFFFFFFFFFF
cdef int64_t NEG = -INF - 1
cdef int32_t TERMINAL = 0, FREE_END = -1  # a push to r2 is r2 >= 1, a slide to y2 is -y2


cdef struct Entry:
    int64_t lo, hi, cost, peak
    int32_t dec, next


cdef struct Res:
    int64_t cost, peak
    int32_t dec


cdef inline Res res_of(int64_t cost, int64_t peak, int32_t dec) noexcept:
    cdef Res res
    res.cost, res.peak, res.dec = cost, peak, dec
    return res


cdef inline int64_t max64(int64_t a, int64_t b) noexcept:
    return a if a > b else b


cdef class Recursion:
    """Z and C for one chain (sizes in bytes, per-layer FLOPs), memoised across budgets.

    ``slides=False`` restricts to persistent schedules (the rotor recursion).
    """

    cdef int n
    cdef bint slides, out_of_memory
    cdef int64_t[::1] w, pre
    cdef int64_t[:, ::1] keep, drop
    cdef int32_t** heads_z
    cdef int32_t** heads_c
    cdef int row_length
    cdef Entry* pool
    cdef Py_ssize_t pool_size, pool_cap
    cdef list forward_ops, backward_ops, free_ops

    def __cinit__(self):
        self.heads_z = self.heads_c = NULL
        self.pool = NULL

    def __init__(self, const int64_t[::1] sizes, const int64_t[::1] flops, bint slides):
        cdef int n = sizes.shape[0] - 1
        cdef int x, j
        cdef int64_t a, b, pair
        if n < 1 or flops.shape[0] != n:
            raise ValueError(f"need N+1 sizes and N flops, got {sizes.shape[0]} and {flops.shape[0]}")
        self.n, self.slides = n, slides
        self.w = np.array(sizes, dtype=np.int64)
        self.pre = np.zeros(n + 1, dtype=np.int64)
        for x in range(n):
            self.pre[x + 1] = self.pre[x] + flops[x]
        self.keep = np.zeros((n + 1, n + 1), dtype=np.int64)
        self.drop = np.zeros((n + 1, n + 1), dtype=np.int64)
        for x in range(n):
            a = b = sizes[x] + sizes[x + 1]
            self.keep[x, x + 1] = a
            self.drop[x, x + 1] = b
            for j in range(x + 2, n + 1):
                pair = sizes[j - 1] + sizes[j]
                a = max64(a, sizes[x] + pair)
                b = max64(b, pair)
                self.keep[x, j] = a
                self.drop[x, j] = b
        # State (y, p, r, e) -> heads[y, p][(r - y) * 2 + e]; with slides r runs over [y, p),
        # and a child (y, p, r2, e) has the same place with r2 in (y, p). Without slides r = y.
        self.row_length = 2 * n if slides else 2
        self.heads_z = <int32_t**> calloc((n + 1) * (n + 1), sizeof(int32_t*))
        if slides:
            self.heads_c = <int32_t**> calloc((n + 1) * (n + 1), sizeof(int32_t*))
        self.pool_cap = 1024
        self.pool = <Entry*> malloc(self.pool_cap * sizeof(Entry))
        if self.heads_z == NULL or self.pool == NULL or (slides and self.heads_c == NULL):
            raise MemoryError(f"no room for the memo of a {n}-layer chain")
        self.pool_size = 0
        self.out_of_memory = False
        self.forward_ops = [("forward", i) for i in range(n)]
        self.backward_ops = [("backward", i) for i in range(n)]
        self.free_ops = [("free", i) for i in range(n + 1)]

    def __dealloc__(self):
        cdef Py_ssize_t k
        for k in range((self.n + 1) * (self.n + 1)):
            if self.heads_z != NULL:
                free(self.heads_z[k])
            if self.heads_c != NULL:
                free(self.heads_c[k])
        free(self.heads_z)
        free(self.heads_c)
        free(self.pool)

    cdef int32_t* heads(self, int32_t** table, int y, int p) noexcept:
        """The list heads of the states (y, p, ., .), created empty on first use (NULL if out
        of memory)."""
        cdef Py_ssize_t k = y * (self.n + 1) + p
        cdef int length = min(self.row_length, 2 * (p - y))
        cdef int i
        if table[k] == NULL:
            table[k] = <int32_t*> malloc(length * sizeof(int32_t))
            if table[k] == NULL:
                self.out_of_memory = True
                return NULL
            for i in range(length):
                table[k][i] = -1
        return table[k]

    cdef inline bint recall(self, int32_t* heads, int slot, int64_t m, Res* out) noexcept:
        cdef int32_t k = heads[slot], before = -1
        cdef Entry* entry
        while k >= 0:
            entry = &self.pool[k]
            if entry.lo <= m <= entry.hi:
                out[0] = res_of(entry.cost, entry.peak, entry.dec)
                if before >= 0:  # move to the front: the same budgets come back in bursts
                    self.pool[before].next = entry.next
                    entry.next = heads[slot]
                    heads[slot] = k
                return True
            before, k = k, entry.next
        return False

    cdef void remember(self, int32_t* heads, int slot, int64_t m, Res res) noexcept:
        cdef int32_t k = heads[slot]
        cdef Entry* entry
        cdef Entry* grown
        while k >= 0:
            entry = &self.pool[k]
            if entry.cost == res.cost and entry.peak == res.peak:  # same optimum up to m too
                if entry.hi < m:
                    entry.hi = m
                return
            k = entry.next
        if self.pool_size == self.pool_cap:
            grown = <Entry*> realloc(self.pool, 2 * self.pool_cap * sizeof(Entry))
            if grown == NULL:  # keep going without memo; value() raises MemoryError after
                self.out_of_memory = True
                return
            self.pool, self.pool_cap = grown, 2 * self.pool_cap
        entry = &self.pool[self.pool_size]
        entry.lo = res.peak if res.cost != INF else NEG  # infeasible: for every m' <= m
        entry.hi, entry.cost, entry.peak, entry.dec = m, res.cost, res.peak, res.dec
        entry.next = heads[slot]
        heads[slot] = <int32_t> self.pool_size
        self.pool_size += 1

    cdef Res z(self, int y, int p, int r, int e, int64_t m) noexcept:
        cdef int64_t own = self.w[y] + (self.w[p] if e else 0)
        cdef int64_t best, best_peak, cost, peak, sweep, extra, floor
        cdef int32_t best_dec
        cdef int32_t* heads
        cdef int r2, y2, last, slot = (r - y) * 2 + e
        cdef Res res, c1, c2
        if own > m:
            return res_of(INF, INF, 0)
        heads = self.heads(self.heads_z, y, p)
        if heads == NULL:
            return res_of(INF, INF, 0)
        if self.recall(heads, slot, m, &res):
            return res
        if y == p - 1:
            if r != y:
                res = res_of(INF, INF, 0)
            elif e:
                res = res_of(0, own, TERMINAL)
            elif self.w[y] + self.w[p] <= m:
                res = res_of(self.pre[p] - self.pre[y], self.w[y] + self.w[p], TERMINAL)
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
                    c2 = self.z(y2, p, r, e, m)
                    if c2.cost == INF:
                        continue
                    cost = self.pre[y2] - self.pre[y] + c2.cost
                    peak = max64(sweep, c2.peak)
                    if cost < best or (cost == best and peak < best_peak):
                        best, best_peak, best_dec = cost, peak, -y2
            res = res_of(best, best_peak, best_dec)
        self.remember(heads, slot, m, res)
        return res

    cdef Res child(self, int y, int p, int r2, int e, int64_t m) noexcept:
        cdef int64_t extra = self.w[p] if e else 0
        cdef int64_t wy = self.w[y]
        cdef int64_t best = INF, best_peak = INF, cost, peak, sweep
        cdef int32_t best_b = 0
        cdef int32_t* heads = NULL
        cdef int b, slot = (r2 - y) * 2 + e
        cdef Res res, c2
        if self.slides:
            heads = self.heads(self.heads_c, y, p)
            if heads == NULL:
                return res_of(INF, INF, 0)
            if self.recall(heads, slot, m, &res):
                return res
        for b in range(y + 1 if self.slides else r2, r2 + 1):
            sweep = self.keep[y, b] + extra
            if sweep > m:
                break
            c2 = self.z(b, p, r2, e, m - wy)
            if c2.cost == INF:
                continue
            cost = self.pre[b] - self.pre[y] + c2.cost
            peak = max64(sweep, c2.peak + wy)
            if cost < best or (cost == best and peak < best_peak):
                best, best_peak, best_b = cost, peak, b
        res = res_of(best, best_peak, best_b)
        if self.slides:
            self.remember(heads, slot, m, res)
        return res

    cdef Res top(self, int64_t budget) except *:
        cdef Res res = self.z(0, self.n, 0, 0, budget)
        if self.out_of_memory:
            raise MemoryError("the planner's memo outgrew the available memory")
        return res

    def value(self, int64_t budget):
        """(total forward FLOPs, peak) of the best schedule within budget, or None."""
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
