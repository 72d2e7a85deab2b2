"""The recursion Z / C of :mod:`ckpt.plan` in plain Python: the test oracle of the compiled
``ckpt._planner.Recursion``, written to be read. It is never used at run time; the tests compare
the two on values and schedules (and both against exhaustive search)."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from ckpt.plan._chain import _Chain
from ckpt.plan._ops import _OpTable
from ckpt.plan._recursion import _inputs

_INF = float("inf")
_TERMINAL, _FREE_END = 0, -1  # Z decisions; a push to r2 is r2 >= 1, a slide to y2 is -y2 <= -2


class _SearchStopped(RuntimeError):
    """The work limit of a bounded search was reached: its results are void."""


class _Recursion:
    """Z and C of the :mod:`ckpt.plan` docstring for one chain, memoised across budgets: per
    activation its size; per element its forward FLOPs, forward scratch, backward scratch (its
    tape kept), tape and internal FLOPs (what its backward recomputes when the tape was not
    kept). Costs are forward FLOPs plus the internal FLOPs of the backwards that rebuild.

    ``slides=False`` restricts to persistent schedules (the rotor recursion). ``limit`` >= 0
    bounds the work: after that many evaluations of Z or C the search stops (``finished`` turns
    False; value() and ops() raise _SearchStopped). ``allowed`` (a flag per activation) restricts
    what a segment longer than ``window`` elements may store or slide to.
    """

    def __init__(self, sizes: Sequence[int], flops: Sequence[int], fwd: Sequence[int],
                 bwd: Sequence[int], tapes: Sequence[int], internal: Sequence[int],
                 slides: bool, limit: int = -1, allowed: Sequence[int] | None = None,
                 window: int = 0) -> None:
        n = self.n = len(sizes) - 1
        if not (len(flops) == len(fwd) == len(bwd) == len(tapes) == len(internal) == n):
            raise ValueError(f"need N+1 sizes and N flops, scratches, tapes and internal flops, "
                             f"got {len(sizes)}, {len(flops)}, {len(fwd)}, {len(bwd)}, "
                             f"{len(tapes)} and {len(internal)}")
        w = list(sizes)
        # tape[j] / rebuild[j]: the tape that can be held beside a_j (element j-1's) and the
        # FLOPs of rebuilding it in backward j-1.
        tape, rebuild = [0] + list(tapes), [0] + list(internal)
        pre = [0]
        for x in flops:
            pre.append(pre[-1] + x)
        restricted = allowed is not None
        if restricted and len(allowed) != n + 1:
            raise ValueError(f"need N+1 = {n + 1} flags in allowed, got {len(allowed)}")
        flags = [bool(a) for a in allowed] if restricted else [True] * (n + 1)
        self.calls, self.finished = 0, True
        # pair[k]: what the forward of a_k holds: a_k, a_(k+1) and its scratch. keep[x][j]: peak
        # of the sweep a_x -> a_j holding a_x throughout; drop[x][j]: the same sweep freeing a_x
        # (and every intermediate) as soon as the next activation exists; both 0 for j = x.
        pair = [w[k] + w[k + 1] + fwd[k] for k in range(n)]
        keep, drop = [], []
        for x in range(n):
            k_row, d_row = [0] * (n + 1), [0] * (n + 1)
            a = b = pair[x]
            k_row[x + 1], d_row[x + 1] = a, b
            for j in range(x + 2, n + 1):
                a, b = max(a, w[x] + pair[j - 1]), max(b, pair[j - 1])
                k_row[j], d_row[j] = a, b
            keep.append(k_row)
            drop.append(d_row)
        none = (_INF, _INF, None, 0)
        memo_z: dict = {}
        memo_c: dict = {}
        dead_z: dict = {}
        dead_c: dict = {}

        def recall(memo: dict, dead: dict, key: tuple, m: int):
            if m <= dead.get(key, -1):
                return none
            for lo, hi, cost, peak, dec, bit in memo.get(key, ()):
                if lo <= m <= hi:
                    return cost, peak, dec, bit
            return None

        def remember(memo: dict, dead: dict, key: tuple, m: int, res: tuple) -> None:
            cost, peak, dec, bit = res
            if cost == _INF:
                if dead.get(key, -1) < m:
                    dead[key] = m
                return
            entries = memo.setdefault(key, [])
            for entry in entries:
                if entry[2] == cost and entry[3] == peak:  # same optimum: it holds up to m too
                    entry[1] = max(entry[1], m)
                    return
            entries.append([peak, m, cost, peak, dec, bit])

        def over() -> bool:
            """Count one evaluation; True when the search must stop."""
            if not self.finished:
                return True
            self.calls += 1
            if 0 <= limit < self.calls:
                self.finished = False
            return not self.finished

        def right(p: int, e: int) -> int:
            """What the right end holds: nothing (e = 0), a_p (1), a_p and its tape (2)."""
            return 0 if not e else w[p] + (tape[p] if e == 2 else 0)

        def z(y: int, p: int, r: int, e: int, t: int, m: int) -> tuple:
            """Z(y, p, r, e, m) of the docstring; e = 2: a_p is held with its tape. a_r is to
            be held with its tape iff t; when r = y that is the top's own, held throughout."""
            top = w[y] + (tape[y] if t and r == y else 0)
            own = top + right(p, e)
            if over() or own > m:
                return none
            key = (y, p, r, e, t)
            hit = recall(memo_z, dead_z, key, m)
            if hit is not None:
                return hit
            best = none
            if y == p - 1:
                if r != y:
                    pass
                elif e:  # backward y, rebuilding its tape unless it was kept
                    peak = own + bwd[y] + (0 if e == 2 else tape[p])
                    if peak <= m:
                        best = (0 if e == 2 else rebuild[p], peak, _TERMINAL, 0)
                    if e == 1 and tape[p]:  # or free a_p and recompute it, keeping its tape
                        cost, peak, _, _ = z(y, p, r, 0, t, m)
                        peak = max(peak, own)
                        if cost < best[0] or (cost == best[0] and peak < best[1]):
                            best = (cost, peak, _FREE_END, 0)
                else:    # forward y (keeping its tape or not), then backward y
                    for k in ((0, 1) if tape[p] else (0,)):
                        peak = max(top + w[p] + fwd[y] + (tape[p] if k else 0),
                                   top + w[p] + tape[p] + bwd[y])
                        cost = pre[p] - pre[y] + (0 if k else rebuild[p])
                        if peak <= m and (cost < best[0] or cost == best[0] and peak < best[1]):
                            best = (cost, peak, _TERMINAL, k)
            else:
                free_choice = not restricted or p - y <= 2 * window
                if e == 1:  # (a_p held with its tape is never freed: keeping it was the waste)
                    cost, peak, _, _ = z(y, p, r, 0, t, m)
                    if cost < _INF:
                        best = (cost, max(peak, own), _FREE_END, 0)
                # The child computes every activation of (y, p) at least once (a_p too if not
                # held), the rest every one of (y, r2): a lower bound growing with r2.
                floor = (pre[p - 1] if e else pre[p]) - 2 * pre[y]
                top_tape = t if r == y else 0
                for r2 in range(r + 1, p):
                    if floor + pre[r2 - 1] > best[0]:
                        break
                    if not (free_choice or flags[r2] or r2 - y <= window):
                        continue
                    for t2 in ((0, 1) if tape[r2] else (0,)):
                        c1, p1, _, _ = child(y, p, r2, e, top_tape, t2, m)
                        if c1 == _INF or c1 > best[0]:
                            continue
                        c2, p2, _, _ = z(y, r2, r, 1 + t2, t, m)
                        cost, peak = c1 + c2, max(p1, p2)
                        if cost < best[0] or (cost == best[0] and peak < best[1]):
                            best = (cost, peak, r2, t2)
                if slides and y > 0:
                    row, extra = drop[y], right(p, e)
                    for y2 in range(y + 1, min(r, p - 1) + 1):
                        if t and y2 == r:  # the new top is a_r: the sweep's last forward keeps
                            sweep = max(row[y2 - 1], pair[y2 - 1] + tape[y2]) + extra
                        else:
                            sweep = row[y2] + extra
                        if sweep > m:
                            break
                        if not (free_choice or flags[y2] or y2 - y <= window):
                            continue
                        c2, p2, _, _ = z(y2, p, r, e, t, m)
                        cost, peak = pre[y2] - pre[y] + c2, max(sweep, p2)
                        if cost < best[0] or (cost == best[0] and peak < best[1]):
                            best = (cost, peak, -y2, 0)
            if self.finished:
                remember(memo_z, dead_z, key, m, best)
            return best

        def child(y: int, p: int, r2: int, e: int, ty: int, t2: int, m: int) -> tuple:
            """C(y, p, r2, e, m) of the docstring; the top a_y holds its tape iff ty, and a_r2
            is to end with its tape iff t2."""
            if over():
                return none
            key = (y, p, r2, e, ty, t2)
            hit = recall(memo_c, dead_c, key, m) if slides else None  # as the compiled twin
            if hit is not None:
                return hit
            row, extra = keep[y], right(p, e) + (tape[y] if ty else 0)
            top = w[y] + (tape[y] if ty else 0)
            best = none
            free_choice = not restricted or p - y <= 2 * window
            for b in range(y + 1 if slides else r2, r2 + 1):
                if b == r2 and t2:  # the sweep's last forward keeps its tape beside a_r2
                    last = pair[b - 1] + (w[y] if b - 1 > y else 0) + tape[b]
                    sweep = max(row[b - 1], last) + extra
                else:
                    sweep = row[b] + extra
                if sweep > m:
                    break
                if b < r2 and not (free_choice or flags[b] or b - y <= window):
                    continue
                c2, p2, _, _ = z(b, p, r2, e, t2, m - top)
                cost, peak = pre[b] - pre[y] + c2, max(sweep, p2 + top)
                if cost < best[0] or (cost == best[0] and peak < best[1]):
                    best = (cost, peak, b, 0)
            if slides and self.finished:
                remember(memo_c, dead_c, key, m, best)
            return best

        self._z, self._child, self._w, self._tape = z, child, w, tape

    def _deep(self):
        """Room for the recursion: depth grows by one per index step, a few frames each."""
        return _RecursionLimit(10 * self.n + 1000)

    def value(self, budget: int) -> tuple[int, int] | None:
        """(total cost, peak) of the best schedule within budget, or None. Raises
        _SearchStopped when the work limit stops the search."""
        with self._deep():
            cost, peak, _, _ = self._z(0, self.n, 0, 0, 0, budget)
        if not self.finished:
            raise _SearchStopped(f"stopped after {self.calls} evaluations")
        return None if cost == _INF else (cost, peak)

    def ops(self, budget: int) -> list:
        """The schedule behind value(budget), which must not be None."""
        return self.schedule(budget)[0]

    def schedule(self, budget: int) -> tuple[list, list]:
        """(ops, kept) behind value(budget), which must not be None: kept lists the positions
        in ops of the forwards that keep their element's tape."""
        self.value(budget)
        table, z, child, w, tape = _OpTable(self.n), self._z, self._child, self._w, self._tape
        out: list = []
        kept: list = []
        # (1, Z state) or (2, C state), last first
        stack: list = [(1, 0, self.n, 0, 0, 0, 0, budget)]
        with self._deep():
            while stack:
                kind, y, p, r, e, t, t2, m = stack.pop()
                if kind == 2:
                    b = child(y, p, r, e, t, t2, m)[2]
                    last = table.sweep(out, y, b, keep=True)
                    if b == r and t2:
                        kept.append(last)
                    stack.append((1, b, p, r, e, t2, 0, m - w[y] - (tape[y] if t else 0)))
                    continue
                _, _, dec, bit = z(y, p, r, e, t, m)
                if dec == _TERMINAL:
                    if not e:
                        if bit:
                            kept.append(len(out))
                        out.append(table.forward[y])
                    out.append(table.backward[y])
                elif dec == _FREE_END:
                    out.append(table.free[p])
                    stack.append((1, y, p, r, 0, t, 0, m))
                elif dec > 0:
                    stack.append((1, y, dec, r, 1 + bit, t, 0, m))
                    stack.append((2, y, p, dec, e, t if r == y else 0, bit, m))
                else:
                    y2 = -dec
                    last = table.sweep(out, y, y2, keep=False)
                    if y2 == r and t:
                        kept.append(last)
                    stack.append((1, y2, p, r, e, t, 0, m))
        return out, kept


class _RecursionLimit:
    def __init__(self, limit: int) -> None:
        self.limit, self.saved = limit, sys.getrecursionlimit()

    def __enter__(self) -> None:
        if self.limit > self.saved:
            sys.setrecursionlimit(self.limit)

    def __exit__(self, *exc: object) -> None:
        sys.setrecursionlimit(self.saved)


def oracle(c: _Chain, method: str, *, keep: bool = True, limit: int = -1,
           units: Sequence[int] | None = None, fwd: Sequence[int] | None = None,
           bwd: Sequence[int] | None = None, tapes: Sequence[int] | None = None,
           allowed: Sequence[int] | None = None, window: int = 0) -> _Recursion:
    """The Python recursion for the same arguments as :func:`ckpt.plan._recursion._recursion`."""
    return _Recursion(*_inputs(c, method, keep, units, fwd, bwd, tapes), limit, allowed, window)
