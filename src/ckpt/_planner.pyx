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
    signed char bit         # the keep choice that goes with dec (see Res)


cdef struct Memo:
    Entry* items            # sorted by lo
    int32_t size, cap, last # last: the entry that answered the previous lookup
    int64_t dead            # no schedule for any m <= dead


cdef struct Res:
    int64_t cost, peak
    int32_t dec
    signed char bit  # terminal: the forward keeps its tape; push: a_r2 ends with its tape


cdef inline Res res_of(int64_t cost, int64_t peak, int32_t dec, signed char bit=0) noexcept:
    cdef Res res
    res.cost, res.peak, res.dec, res.bit = cost, peak, dec, bit
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
    """Z and C for one chain, memoised across budgets: per activation its size; per element its
    forward FLOPs, forward scratch, backward scratch (its tape kept), tape and internal FLOPs
    (any one unit of memory, FLOPs in any one unit). Costs are forward FLOPs plus the internal
    FLOPs of the backwards that rebuild their tape; a forward may keep its element's tape.

    ``slides=False`` restricts to persistent schedules (the rotor recursion). ``limit`` >= 0
    bounds the work: after that many evaluations of Z or C the search stops, ``finished`` turns
    False and no result of this object may be used. ``allowed`` (one flag per activation),
    when given, restricts what a segment longer than ``window`` elements may store or slide to:
    only activations whose flag is set (a bounded search for long chains).
    """

    cdef int n, window, ne, nt
    cdef bint slides, out_of_memory, aborted, restricted
    cdef signed char[::1] allowed
    cdef int64_t limit, n_calls
    cdef int64_t[::1] w, pre, bwd, pair, tape, rebuild
    cdef int64_t[:, ::1] keep, drop
    cdef Memo** rows_z
    cdef Memo** rows_c
    cdef list forward_ops, backward_ops, free_ops

    def __cinit__(self):
        self.rows_z = self.rows_c = NULL

    def __init__(self, const int64_t[::1] sizes, const int64_t[::1] flops,
                 const int64_t[::1] forward_scratch, const int64_t[::1] backward_scratch,
                 const int64_t[::1] tapes, const int64_t[::1] internal,
                 bint slides, int64_t limit=-1, allowed=None, int window=0):
        cdef int n = sizes.shape[0] - 1
        cdef int x, j
        cdef int64_t a, b
        if n < 1 or flops.shape[0] != n or forward_scratch.shape[0] != n \
                or backward_scratch.shape[0] != n or tapes.shape[0] != n \
                or internal.shape[0] != n:
            raise ValueError(
                f"need N+1 sizes and N flops, scratches, tapes and internal flops, got "
                f"{sizes.shape[0]}, {flops.shape[0]}, {forward_scratch.shape[0]}, "
                f"{backward_scratch.shape[0]}, {tapes.shape[0]} and {internal.shape[0]}")
        self.n, self.slides, self.limit, self.n_calls, self.aborted = n, slides, limit, 0, False
        self.restricted, self.window = allowed is not None, window
        self.allowed = np.ones(n + 1, dtype=np.int8) if allowed is None \
            else np.array(allowed, dtype=np.int8).reshape(-1)
        if self.allowed.shape[0] != n + 1:
            raise ValueError(f"need N+1 = {n + 1} flags in allowed, got {self.allowed.shape[0]}")
        self.w = np.array(sizes, dtype=np.int64)
        self.bwd = np.array(backward_scratch, dtype=np.int64)
        # tape[j] / rebuild[j]: the tape that can be held beside a_j (element j-1's) and the
        # FLOPs of rebuilding it in backward j-1.
        self.tape = np.zeros(n + 1, dtype=np.int64)
        self.rebuild = np.zeros(n + 1, dtype=np.int64)
        self.pre = np.zeros(n + 1, dtype=np.int64)
        self.pair = np.zeros(n, dtype=np.int64)
        for x in range(n):
            self.pre[x + 1] = self.pre[x] + flops[x]
            self.tape[x + 1], self.rebuild[x + 1] = tapes[x], internal[x]
            self.pair[x] = sizes[x] + sizes[x + 1] + forward_scratch[x]
        # Without tapes the keep choices vanish: e in {0, 1}, t = 0.
        self.ne, self.nt = (3, 2) if np.any(np.asarray(tapes)) else (2, 1)
        # pair[k]: what the forward of a_k holds: a_k, a_(k+1) and its scratch. keep[x, j] /
        # drop[x, j]: peak of the sweep a_x -> a_j holding a_x throughout / freeing it (and
        # every intermediate) as soon as the next activation exists; both 0 for j = x.
        self.keep = np.zeros((n + 1, n + 1), dtype=np.int64)
        self.drop = np.zeros((n + 1, n + 1), dtype=np.int64)
        for x in range(n):
            a = b = self.pair[x]
            self.keep[x, x + 1] = a
            self.drop[x, x + 1] = b
            for j in range(x + 2, n + 1):
                a = max64(a, sizes[x] + self.pair[j - 1])
                b = max64(b, self.pair[j - 1])
                self.keep[x, j] = a
                self.drop[x, j] = b
        # State (y, p, r, e, t) -> rows_z[y, p][((r - y) * ne + e) * nt + t], with slides r
        # running over [y, p); without slides r = y. A child (y, p, r2, e, ty, t2) -> rows_c[y, p]
        # [(((r2 - y) * ne + e) * nt + ty) * nt + t2], r2 in (y, p) (children are memoised
        # only with slides).
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
        self.free_rows(self.rows_z, False)
        self.free_rows(self.rows_c, True)

    cdef void free_rows(self, Memo** table, bint children) noexcept:
        cdef int y, p, i
        cdef Memo* row
        if table == NULL:
            return
        for p in range(1, self.n + 1):
            for y in range(p):
                row = table[y * (self.n + 1) + p]
                if row != NULL:
                    for i in range(self.length(y, p, children)):
                        free(row[i].items)
                    free(row)
        free(table)

    cdef inline int length(self, int y, int p, bint children) noexcept:
        """States per (y, p): r (or r2) in [y, p) (just r = y for Z without slides), e, t (and
        the top's ty for a child)."""
        cdef int states = self.ne * self.nt * (self.nt if children else 1)
        return states * (p - y) if self.slides else states

    cdef Memo* memo(self, Memo** table, int y, int p, int slot, bint children) noexcept:
        """The memo of one state of (y, p), created empty with its row (NULL if out of memory)."""
        cdef Py_ssize_t k = y * (self.n + 1) + p
        cdef int i, size
        if table[k] == NULL:
            size = self.length(y, p, children)
            table[k] = <Memo*> calloc(size, sizeof(Memo))
            if table[k] == NULL:
                self.out_of_memory = True
                return NULL
            for i in range(size):
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
        out[0] = res_of(items[k].cost, items[k].peak, items[k].dec, items[k].bit)
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
        memo.items[k].peak, memo.items[k].dec, memo.items[k].bit = res.peak, res.dec, res.bit
        memo.size += 1
        memo.last = k

    cdef inline int64_t right(self, int p, int e) noexcept:
        """What the right end holds: nothing (e = 0), a_p (1), a_p and its tape (2)."""
        if e == 0:
            return 0
        return self.w[p] + (self.tape[p] if e == 2 else 0)

    cdef Res z(self, int y, int p, int r, int e, int t, int64_t m) noexcept:
        cdef int64_t top = self.w[y] + (self.tape[y] if t and r == y else 0)
        cdef int64_t own = top + self.right(p, e)
        cdef int64_t best, best_peak, cost, peak, sweep, extra, floor
        cdef int32_t best_dec
        cdef signed char best_bit
        cdef Memo* memo
        cdef int r2, y2, last, k, t2, top_tape
        cdef bint free_choice = not self.restricted or p - y <= 2 * self.window
        cdef Res res, c1, c2
        if self.over() or own > m:
            return res_of(INF, INF, 0)
        memo = self.memo(self.rows_z, y, p, ((r - y) * self.ne + e) * self.nt + t, False)
        if memo == NULL:
            return res_of(INF, INF, 0)
        if self.recall(memo, m, &res):
            return res
        best, best_peak, best_dec, best_bit = INF, INF, 0, 0
        if y == p - 1:
            if r != y:
                pass
            elif e:  # backward y, rebuilding its tape unless it was kept
                peak = own + self.bwd[y] + (0 if e == 2 else self.tape[p])
                if peak <= m:
                    best, best_peak = (0 if e == 2 else self.rebuild[p]), peak
                if e == 1 and self.tape[p]:  # or free a_p and recompute it, keeping its tape
                    c2 = self.z(y, p, r, 0, t, m)
                    if c2.cost != INF:
                        peak = max64(c2.peak, own)
                        if c2.cost < best or (c2.cost == best and peak < best_peak):
                            best, best_peak, best_dec = c2.cost, peak, FREE_END
            else:    # forward y (keeping its tape or not), then backward y
                for k in range(2 if self.tape[p] else 1):
                    peak = max64(top + self.pair[y] - self.w[y] + (self.tape[p] if k else 0),
                                 top + self.w[p] + self.tape[p] + self.bwd[y])
                    cost = self.pre[p] - self.pre[y] + (0 if k else self.rebuild[p])
                    if peak <= m and (cost < best or (cost == best and peak < best_peak)):
                        best, best_peak, best_bit = cost, peak, k
        else:
            if e == 1:  # (a_p held with its tape is never freed: keeping it was the waste)
                c2 = self.z(y, p, r, 0, t, m)
                if c2.cost != INF:
                    best, best_peak, best_dec = c2.cost, max64(c2.peak, own), FREE_END
            floor = (self.pre[p - 1] if e else self.pre[p]) - 2 * self.pre[y]
            top_tape = t if r == y else 0
            for r2 in range(r + 1, p):
                if best != INF and floor + self.pre[r2 - 1] > best:
                    break
                if not (free_choice or self.allowed[r2] or r2 - y <= self.window):
                    continue
                for t2 in range(2 if self.nt == 2 and self.tape[r2] else 1):
                    c1 = self.child(y, p, r2, e, top_tape, t2, m)
                    if c1.cost == INF or c1.cost > best:
                        continue
                    c2 = self.z(y, r2, r, 1 + t2, t, m)
                    if c2.cost == INF:
                        continue
                    cost, peak = c1.cost + c2.cost, max64(c1.peak, c2.peak)
                    if cost < best or (cost == best and peak < best_peak):
                        best, best_peak, best_dec, best_bit = cost, peak, r2, t2
            if self.slides and y > 0:
                extra = self.right(p, e)
                last = r if r < p - 1 else p - 1
                for y2 in range(y + 1, last + 1):
                    if t and y2 == r:  # the new top is a_r: the sweep's last forward keeps
                        sweep = max64(self.drop[y, y2 - 1],
                                      self.pair[y2 - 1] + self.tape[y2]) + extra
                    else:
                        sweep = self.drop[y, y2] + extra
                    if sweep > m:
                        break
                    if not (free_choice or self.allowed[y2] or y2 - y <= self.window):
                        continue
                    c2 = self.z(y2, p, r, e, t, m)
                    if c2.cost == INF:
                        continue
                    cost = self.pre[y2] - self.pre[y] + c2.cost
                    peak = max64(sweep, c2.peak)
                    if cost < best or (cost == best and peak < best_peak):
                        best, best_peak, best_dec, best_bit = cost, peak, -y2, 0
        res = res_of(best, best_peak, best_dec, best_bit)
        if not self.aborted:
            self.remember(memo, m, res)
        return res

    cdef Res child(self, int y, int p, int r2, int e, int ty, int t2, int64_t m) noexcept:
        cdef int64_t extra = self.right(p, e) + (self.tape[y] if ty else 0)
        cdef int64_t top = self.w[y] + (self.tape[y] if ty else 0)
        cdef int64_t best = INF, best_peak = INF, cost, peak, sweep, last
        cdef int32_t best_b = 0
        cdef Memo* memo = NULL
        cdef int b
        cdef bint free_choice = not self.restricted or p - y <= 2 * self.window
        cdef Res res, c2
        if self.over():
            return res_of(INF, INF, 0)
        if self.slides:
            memo = self.memo(self.rows_c, y, p,
                             (((r2 - y) * self.ne + e) * self.nt + ty) * self.nt + t2, True)
            if memo == NULL:
                return res_of(INF, INF, 0)
            if self.recall(memo, m, &res):
                return res
        for b in range(y + 1 if self.slides else r2, r2 + 1):
            if b == r2 and t2:  # the sweep's last forward keeps its tape beside a_r2
                last = self.pair[b - 1] + (self.w[y] if b - 1 > y else 0) + self.tape[b]
                sweep = max64(self.keep[y, b - 1], last) + extra
            else:
                sweep = self.keep[y, b] + extra
            if sweep > m:
                break
            if b < r2 and not (free_choice or self.allowed[b] or b - y <= self.window):
                continue
            c2 = self.z(b, p, r2, e, t2, m - top)
            if c2.cost == INF:
                continue
            cost = self.pre[b] - self.pre[y] + c2.cost
            peak = max64(sweep, c2.peak + top)
            if cost < best or (cost == best and peak < best_peak):
                best, best_peak, best_b = cost, peak, b
        res = res_of(best, best_peak, best_b)
        if self.slides and not self.aborted:
            self.remember(memo, m, res)
        return res

    cdef Res top(self, int64_t budget) except *:
        cdef Res res = self.z(0, self.n, 0, 0, 0, budget)
        if self.out_of_memory:
            raise MemoryError("the planner's memo outgrew the available memory")
        if self.aborted:
            raise RuntimeError("the search stopped at its work limit: its results are void")
        return res

    def value(self, int64_t budget):
        """(total cost, peak) of the best schedule within budget, or None. Raises RuntimeError
        when the work limit stops the search (then ``finished`` is False)."""
        cdef Res res = self.top(budget)
        return None if res.cost == INF else (res.cost, res.peak)

    cdef Py_ssize_t sweep(self, list out, int x, int j, bint keep):
        """Forwards from a_x to a_j, freeing each intermediate (and a_x unless keep); returns
        the position in ``out`` of the last forward (-1 when x = j: none)."""
        cdef int k
        cdef Py_ssize_t last = -1
        for k in range(x, j):
            last = len(out)
            out.append(self.forward_ops[k])
            if k > x or not keep:
                out.append(self.free_ops[k])
        return last

    def ops(self, int64_t budget):
        """The schedule behind value(budget), which must not be None."""
        return self.schedule(budget)[0]

    def schedule(self, int64_t budget):
        """(ops, kept) behind value(budget), which must not be None: kept lists the positions
        in ops of the forwards that keep their element's tape."""
        cdef list out = [], kept = [], stack = [(1, 0, self.n, 0, 0, 0, 0, budget)]
        cdef int kind, y, p, r, e, t, t2, b, y2
        cdef Py_ssize_t last
        cdef int64_t m
        cdef Res res
        self.top(budget)
        while stack:
            kind, y, p, r, e, t, t2, m = stack.pop()
            if kind == 2:  # a child; t is its top's ty
                b = self.child(y, p, r, e, t, t2, m).dec
                last = self.sweep(out, y, b, True)
                if b == r and t2:
                    kept.append(last)
                stack.append((1, b, p, r, e, t2, 0, m - self.w[y] - (self.tape[y] if t else 0)))
                continue
            res = self.z(y, p, r, e, t, m)
            if res.dec == TERMINAL:
                if not e:
                    if res.bit:
                        kept.append(len(out))
                    out.append(self.forward_ops[y])
                out.append(self.backward_ops[y])
            elif res.dec == FREE_END:
                out.append(self.free_ops[p])
                stack.append((1, y, p, r, 0, t, 0, m))
            elif res.dec > 0:
                stack.append((1, y, res.dec, r, 1 + res.bit, t, 0, m))
                stack.append((2, y, p, res.dec, e, t if r == y else 0, res.bit, m))
            else:
                y2 = -res.dec
                last = self.sweep(out, y, y2, False)
                if y2 == r and t:
                    kept.append(last)
                stack.append((1, y2, p, r, e, t, 0, m))
        return out, kept
