"""Schedules as lists of shared operation tuples."""
from __future__ import annotations

from ckpt.schedule import BACKWARD, FORWARD, FREE


class _OpTable:
    """Shared (kind, i) tuples, so a long schedule holds references, not new tuples."""

    def __init__(self, n: int) -> None:
        self.forward = [(FORWARD, i) for i in range(n)]
        self.backward = [(BACKWARD, i) for i in range(n)]
        self.free = [(FREE, i) for i in range(n + 1)]

    def sweep(self, out: list, x: int, j: int, keep: bool) -> int:
        """Forwards from a_x to a_j, freeing each intermediate (and a_x unless keep); returns
        the position in ``out`` of the last forward (-1 when x = j: none)."""
        last = -1
        for k in range(x, j):
            last = len(out)
            out.append(self.forward[k])
            if k > x or not keep:
                out.append(self.free[k])
        return last
