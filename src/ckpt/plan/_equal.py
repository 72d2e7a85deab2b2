"""Equal layers: the binomial closed form of :mod:`ckpt.plan` (its "Equal layers" section)."""
from __future__ import annotations

from ckpt.plan._ops import _OpTable


class _EqualChain:
    """Optimal costs and schedules for n equal layers with up to ``slots`` activations held.

    ``ca[m][r]`` / ``cb[m][r]``: how many steps of slope r (a layer run r times) the convex cost
    L -> A(L, m) / B(L, m) has; each list stops once it covers n - 1 steps.
    """

    def __init__(self, n: int, slots: int) -> None:
        self.n = n
        top = max(2, min(slots, n + 1))
        need = n - 1
        self.ca: list = [[0], [0], [0]]
        self.cb: list = [[0], [0], [0]]
        # Counts only grow with m, so list m never reads past the end of list m - 1.
        for m in range(3, top + 1):
            ca, total = [0], 0
            while total < need:
                r = len(ca)
                ca.append(int(r != 2) if m == 3 else (r == 1) + self.ca[m - 1][r] + ca[r - 1])
                total += ca[-1]
            cb, total = [0], 0
            while total < need:
                r = len(cb)
                cb.append((r == 1) + (self.cb[m - 1][r] if m > 3 else 0) + ca[r - 1])
                total += cb[-1]
            self.ca.append(ca)
            self.cb.append(cb)

    def cost(self, m: int) -> int:
        """B(n, m): layer forwards of the best plan with m slots (n >= 2 needs m >= 3)."""
        left, total, r = self.n - 1, 1, 0
        while left > 0:
            r += 1
            take = min(left, self.cb[m][r])
            total += r * take
            left -= take
        return total

    @staticmethod
    def _split(length: int, g: list, k: list) -> int:
        """Optimal first stored offset d of the min-plus convolution of g(d) = d + A(d, m)
        (slope counts of A shifted up by one) and a convex k: the L-2 smallest merged slopes,
        d - 1 of them from g."""
        left, from_g, r = length - 2, 0, 0
        while left > 0:
            r += 1
            take = min(left, k[r])
            left -= take
            take = min(left, g[r - 1])
            left -= take
            from_g += take
        return 1 + from_g

    def ops(self, m: int) -> list:
        """Schedule of B(n, m): the top segment, a_n not yet computed (m <= n + 1)."""
        table, ca, cb = _OpTable(self.n), self.ca, self.cb
        out: list = []
        stack: list = [("B", 0, self.n, m)]  # segments still to do, last first
        while stack:
            kind, s, t, mm = stack.pop()
            length = t - s
            if length == 1:
                if kind == "B":
                    out.append(table.forward[s])
                out.append(table.backward[s])
            elif kind == "A" and mm == 3:
                if length == 2:  # a_{s+1} fits beside a_s and a_t
                    out += [table.forward[s], table.backward[s + 1], table.backward[s]]
                else:  # no room to keep a_t while recomputing: free it, rebuild it at the end
                    out.append(table.free[t])
                    stack.append(("B", s, t, 3))
            else:
                if kind == "A":
                    d = self._split(length, ca[mm], ca[mm - 1])
                elif mm == 3:
                    d = length - 1
                else:
                    d = self._split(length, ca[mm], cb[mm - 1])
                table.sweep(out, s, s + d, keep=True)
                stack.append(("A", s, s + d, mm))
                stack.append((kind, s + d, t, mm - 1))
        return out


def _equal_best_slots(eq: _EqualChain, slots: int) -> int:
    """Fewest slots with the same cost as ``slots`` (<= n + 1): the least peak for that cost."""
    best = eq.cost(slots)
    low = 2 if eq.n == 1 else 3
    while slots > low and eq.cost(slots - 1) == best:
        slots -= 1
    return slots
