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
    activation its size, per element its forward FLOPs, forward scratch and backward scratch.

    ``slides=False`` restricts to persistent schedules (the rotor recursion). ``limit`` >= 0
    bounds the work: after that many evaluations of Z or C the search stops (``finished`` turns
    False; value() and ops() raise _SearchStopped). ``allowed`` (a flag per activation) restricts
    what a segment longer than ``window`` elements may store or slide to.
    """

    def __init__(self, sizes: Sequence[int], flops: Sequence[int], fwd: Sequence[int],
                 bwd: Sequence[int], slides: bool, limit: int = -1,
                 allowed: Sequence[int] | None = None, window: int = 0) -> None:
        n = self.n = len(sizes) - 1
        if len(flops) != n or len(fwd) != n or len(bwd) != n:
            raise ValueError(f"need N+1 sizes and N flops and scratches, got {len(sizes)}, "
                             f"{len(flops)}, {len(fwd)} and {len(bwd)}")
        w = list(sizes)
        pre = [0]
        for x in flops:
            pre.append(pre[-1] + x)
        restricted = allowed is not None
        if restricted and len(allowed) != n + 1:
            raise ValueError(f"need N+1 = {n + 1} flags in allowed, got {len(allowed)}")
        flags = [bool(a) for a in allowed] if restricted else [True] * (n + 1)
        self.calls, self.finished = 0, True
        # keep[x][j]: peak of the sweep a_x -> a_j holding a_x throughout; drop[x][j]: the same
        # sweep freeing a_x (and every intermediate) as soon as the next activation exists. The
        # forward of a_k holds a_k, a_(k+1) and its scratch (and a_x when kept).
        keep, drop = [], []
        for x in range(n):
            k_row, d_row = [0] * (n + 1), [0] * (n + 1)
            a = b = w[x] + w[x + 1] + fwd[x]
            k_row[x + 1], d_row[x + 1] = a, b
            for j in range(x + 2, n + 1):
                pair = w[j - 1] + w[j] + fwd[j - 1]
                a, b = max(a, w[x] + pair), max(b, pair)
                k_row[j], d_row[j] = a, b
            keep.append(k_row)
            drop.append(d_row)
        none = (_INF, _INF, None)
        memo_z: dict = {}
        memo_c: dict = {}
        dead_z: dict = {}
        dead_c: dict = {}

        def recall(memo: dict, dead: dict, key: tuple, m: int):
            if m <= dead.get(key, -1):
                return none
            for lo, hi, cost, peak, dec in memo.get(key, ()):
                if lo <= m <= hi:
                    return cost, peak, dec
            return None

        def remember(memo: dict, dead: dict, key: tuple, m: int, res: tuple) -> None:
            cost, peak, dec = res
            if cost == _INF:
                if dead.get(key, -1) < m:
                    dead[key] = m
                return
            entries = memo.setdefault(key, [])
            for entry in entries:
                if entry[2] == cost and entry[3] == peak:  # same optimum: it holds up to m too
                    entry[1] = max(entry[1], m)
                    return
            entries.append([peak, m, cost, peak, dec])

        def over() -> bool:
            """Count one evaluation; True when the search must stop."""
            if not self.finished:
                return True
            self.calls += 1
            if 0 <= limit < self.calls:
                self.finished = False
            return not self.finished

        def z(y: int, p: int, r: int, e: int, m: int) -> tuple:
            own = w[y] + w[p] if e else w[y]
            if over() or own > m:
                return none
            key = (y, p, r, e)
            hit = recall(memo_z, dead_z, key, m)
            if hit is not None:
                return hit
            if y == p - 1:
                if r != y:
                    res = none
                elif e:  # backward y
                    peak = own + bwd[y]
                    res = (0, peak, _TERMINAL) if peak <= m else none
                else:    # forward y, then backward y
                    peak = max(drop[y][p], own + w[p] + bwd[y])
                    res = (pre[p] - pre[y], peak, _TERMINAL) if peak <= m else none
            else:
                free_choice = not restricted or p - y <= 2 * window
                best, best_peak, best_dec = _INF, _INF, None
                if e:
                    cost, peak, _ = z(y, p, r, 0, m)
                    if cost < _INF:
                        best, best_peak, best_dec = cost, max(peak, own), _FREE_END
                # The child computes every activation of (y, p) at least once (a_p too if not
                # held), the rest every one of (y, r2): a lower bound growing with r2.
                floor = (pre[p - 1] if e else pre[p]) - 2 * pre[y]
                for r2 in range(r + 1, p):
                    if floor + pre[r2 - 1] > best:
                        break
                    if not (free_choice or flags[r2] or r2 - y <= window):
                        continue
                    c1, p1, _ = child(y, p, r2, e, m)
                    if c1 == _INF or c1 > best:
                        continue
                    c2, p2, _ = z(y, r2, r, 1, m)
                    cost, peak = c1 + c2, max(p1, p2)
                    if cost < best or (cost == best and peak < best_peak):
                        best, best_peak, best_dec = cost, peak, r2
                if slides and y > 0:
                    row, extra = drop[y], (w[p] if e else 0)
                    for y2 in range(y + 1, min(r, p - 1) + 1):
                        sweep = row[y2] + extra
                        if sweep > m:
                            break
                        if not (free_choice or flags[y2] or y2 - y <= window):
                            continue
                        c2, p2, _ = z(y2, p, r, e, m)
                        cost, peak = pre[y2] - pre[y] + c2, max(sweep, p2)
                        if cost < best or (cost == best and peak < best_peak):
                            best, best_peak, best_dec = cost, peak, -y2
                res = (best, best_peak, best_dec)
            if self.finished:
                remember(memo_z, dead_z, key, m, res)
            return res

        def child(y: int, p: int, r2: int, e: int, m: int) -> tuple:
            if over():
                return none
            key = (y, p, r2, e)
            hit = recall(memo_c, dead_c, key, m) if slides else None  # as the compiled twin
            if hit is not None:
                return hit
            row, extra, wy = keep[y], (w[p] if e else 0), w[y]
            best, best_peak, best_b = _INF, _INF, None
            free_choice = not restricted or p - y <= 2 * window
            for b in range(y + 1 if slides else r2, r2 + 1):
                sweep = row[b] + extra
                if sweep > m:
                    break
                if b < r2 and not (free_choice or flags[b] or b - y <= window):
                    continue
                c2, p2, _ = z(b, p, r2, e, m - wy)
                cost, peak = pre[b] - pre[y] + c2, max(sweep, p2 + wy)
                if cost < best or (cost == best and peak < best_peak):
                    best, best_peak, best_b = cost, peak, b
            res = (best, best_peak, best_b)
            if slides and self.finished:
                remember(memo_c, dead_c, key, m, res)
            return res

        self._z, self._child, self._w = z, child, w

    def _deep(self):
        """Room for the recursion: depth grows by one per index step, a few frames each."""
        return _RecursionLimit(10 * self.n + 1000)

    def value(self, budget: int) -> tuple[int, int] | None:
        """(total forward FLOPs, peak) of the best schedule within budget, or None. Raises
        _SearchStopped when the work limit stops the search."""
        with self._deep():
            cost, peak, _ = self._z(0, self.n, 0, 0, budget)
        if not self.finished:
            raise _SearchStopped(f"stopped after {self.calls} evaluations")
        return None if cost == _INF else (cost, peak)

    def ops(self, budget: int) -> list:
        """The schedule behind value(budget), which must not be None."""
        self.value(budget)
        table, z, child, w = _OpTable(self.n), self._z, self._child, self._w
        out: list = []
        stack: list = [(1, 0, self.n, 0, 0, budget)]  # (1, Z state) or (2, C state), last first
        with self._deep():
            while stack:
                kind, y, p, r, e, m = stack.pop()
                if kind == 2:
                    b = child(y, p, r, e, m)[2]
                    table.sweep(out, y, b, keep=True)
                    stack.append((1, b, p, r, e, m - w[y]))
                    continue
                dec = z(y, p, r, e, m)[2]
                if dec == _TERMINAL:
                    if not e:
                        out.append(table.forward[y])
                    out.append(table.backward[y])
                elif dec == _FREE_END:
                    out.append(table.free[p])
                    stack.append((1, y, p, r, 0, m))
                elif dec > 0:
                    stack.append((1, y, dec, r, 1, m))
                    stack.append((2, y, p, dec, e, m))
                else:
                    table.sweep(out, y, -dec, keep=False)
                    stack.append((1, -dec, p, r, e, m))
        return out


class _RecursionLimit:
    def __init__(self, limit: int) -> None:
        self.limit, self.saved = limit, sys.getrecursionlimit()

    def __enter__(self) -> None:
        if self.limit > self.saved:
            sys.setrecursionlimit(self.limit)

    def __exit__(self, *exc: object) -> None:
        sys.setrecursionlimit(self.saved)


def oracle(c: _Chain, method: str, *, limit: int = -1, units: Sequence[int] | None = None,
           fwd: Sequence[int] | None = None, bwd: Sequence[int] | None = None,
           allowed: Sequence[int] | None = None, window: int = 0) -> _Recursion:
    """The Python recursion for the same arguments as :func:`ckpt.plan._recursion._recursion`."""
    return _Recursion(*_inputs(c, method, units, fwd, bwd), limit, allowed, window)
