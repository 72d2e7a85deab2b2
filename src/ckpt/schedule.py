"""Checkpointing schedules: which activations to keep, what to recompute, and where it lives.

A schedule is a sequence of operations on the activations a_0 ... a_N of a chain of N layers
(a_i is the input of layer i, a_N the output):

- ``("forward", i)``: compute a_{i+1} from a_i (which must be held);
- ``("backward", i)``: back-propagate through layer i (needs a_i and a_{i+1}); frees a_{i+1};
- ``("free", i)``: a_i is no longer needed.

Only a_0 is held at the start. The *forward phase* runs up to the first computation of a_N;
the *backward phase* is the rest. :func:`compile_schedule` checks a schedule, places every
activation in one arena with static offsets (so a step allocates one block, not one per
activation), and emits the integer rows that ckpt's typed executor runs.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Sequence, Tuple

import numpy as np

from ckpt._core import OP_CODES

Op = Tuple[str, int]

# Column meaning of a compiled row: kind, layer or activation index, arena offset, recompute flag.
_OUTPUT = -1  # offset of a_N, which is written to the caller's output array instead


def uniform_ops(n_layers: int, checkpoint_every: int) -> list:
    """The classic schedule of segment checkpointing (Chen et al. 2016, "Training deep nets with
    sublinear memory cost"): keep the inputs of layers 0, k, 2k, ...; in backward, recompute each
    segment once from its start, then back-propagate through it.

    k = 1 keeps everything (plain backprop); k = 0 (or k >= N) keeps only a_0. A segment of S
    layers recomputes S - 1 of them: its last layer's output is the next segment's start or the
    network output, both held. Total recomputation: N - ceil(N / k) layer forwards.
    """
    n, k = n_layers, checkpoint_every
    if k <= 0 or k > n:
        k = n
    starts = list(range(0, n, k))
    ops: list = []
    for i in range(n):
        ops.append(("forward", i))
        if i > 0 and i % k != 0:
            ops.append(("free", i))
    for start in reversed(starts):
        end = min(start + k, n)
        for i in range(start, end - 1):
            ops.append(("forward", i))
        # Each backward frees its layer's output; the segment start goes with the next one.
        for i in reversed(range(start, end)):
            ops.append(("backward", i))
    return ops


class _Arena:
    """First-fit placement of blocks in one buffer, in units of batch rows."""

    def __init__(self) -> None:
        self.blocks: list = []  # sorted (start, end)
        self.size = 0

    def allocate(self, length: int) -> int:
        start = 0
        for lo, hi in self.blocks:
            if lo - start >= length:
                break
            start = max(start, hi)
        bisect.insort(self.blocks, (start, start + length))
        self.size = max(self.size, start + length)
        return start

    def release(self, start: int) -> None:
        index = next(i for i, (lo, _) in enumerate(self.blocks) if lo == start)
        del self.blocks[index]


@dataclass(frozen=True)
class CompiledSchedule:
    """A checked schedule with static arena offsets, in units of one batch row."""

    widths: Tuple[int, ...]
    forward_rows: np.ndarray   # int64 (rows, 4), offsets per batch row
    backward_rows: np.ndarray
    arena_units: int           # arena size per batch row, in elements
    peak_units: int            # most activation elements held at once per batch row (a_0 included)
    recomputed_layers: Tuple[int, ...]  # layers forwarded again in the backward phase, in order
    ops: Tuple[Op, ...]        # the full schedule, frees made explicit

    @property
    def recomputed_units(self) -> int:
        """Activation elements recomputed per batch row."""
        return sum(self.widths[i + 1] for i in self.recomputed_layers)

    def rows_for_batch(self, batch: int) -> Tuple[np.ndarray, np.ndarray]:
        """The forward and backward rows with offsets scaled to a batch size."""
        out = []
        for rows in (self.forward_rows, self.backward_rows):
            scaled = rows.copy()
            placed = scaled[:, 2] >= 0
            scaled[placed, 2] *= batch
            out.append(scaled)
        return out[0], out[1]


def compile_schedule(ops: Iterable[Op], widths: Sequence[int]) -> CompiledSchedule:
    """Check a schedule against the rules above and place its activations in an arena.

    Raises ValueError naming the first illegal operation. Frees of activations that are not held
    are ignored (a backward frees its output already); at the end every activation still held,
    a_0 included, is freed.
    """
    widths = tuple(int(w) for w in widths)
    n = len(widths) - 1
    held = {0: None}          # activation -> arena offset (None for a_0, _OUTPUT for a_N)
    ran = [0] * n             # forwards per layer
    next_backward = n - 1
    arena = _Arena()
    rows: list = []
    full: list = []
    recomputed: list = []
    forward_phase_end = None
    current = peak = widths[0]

    def release(i: int) -> None:
        nonlocal current
        offset = held.pop(i)
        current -= widths[i]
        if offset is not None and offset != _OUTPUT:
            arena.release(offset)

    for step, (kind, i) in enumerate(ops):
        if kind not in OP_CODES:
            raise ValueError(f"operation {step}: unknown kind {kind!r}")
        bound = n if kind == "free" else n - 1
        if not 0 <= i <= bound:
            raise ValueError(f"operation {step}: {kind} {i} is outside a chain of {n} layers")
        if kind == "forward":
            if i not in held or i + 1 in held:
                raise ValueError(f"operation {step}: forward {i} needs a_{i} held and a_{i + 1} not")
            if next_backward < i:
                raise ValueError(f"operation {step}: forward {i} after its backward")
            offset = _OUTPUT if i == n - 1 else arena.allocate(widths[i + 1])
            held[i + 1] = offset
            current += widths[i + 1]
            peak = max(peak, current)
            if ran[i]:
                recomputed.append(i)
            rows.append((OP_CODES[kind], i, offset, 1 if ran[i] else 0))
            ran[i] += 1
            if i == n - 1 and forward_phase_end is None:
                forward_phase_end = len(rows)
        elif kind == "backward":
            if forward_phase_end is None:
                raise ValueError(f"operation {step}: backward {i} before the output is computed")
            if i != next_backward:
                raise ValueError(f"operation {step}: backward {i}, expected backward {next_backward}")
            if i not in held or i + 1 not in held:
                raise ValueError(f"operation {step}: backward {i} needs a_{i} and a_{i + 1} held")
            rows.append((OP_CODES[kind], i, 0, 0))
            release(i + 1)
            next_backward -= 1
        else:
            if i not in held:
                continue
            if i == 0 and next_backward >= 0:
                raise ValueError(f"operation {step}: a_0 is freed before backward 0")
            rows.append((OP_CODES[kind], i, 0, 0))
            release(i)
        full.append((kind, i))
    if next_backward >= 0:
        raise ValueError(f"the schedule ends before backward {next_backward}")
    # Frees right after the output belong to the forward phase: nothing waits for backward then.
    while rows[forward_phase_end][0] == OP_CODES["free"]:
        forward_phase_end += 1
    for i in sorted(held):
        rows.append((OP_CODES["free"], i, 0, 0))
        full.append(("free", i))
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)
    return CompiledSchedule(
        widths=widths,
        forward_rows=np.ascontiguousarray(table[:forward_phase_end]),
        backward_rows=np.ascontiguousarray(table[forward_phase_end:]),
        arena_units=arena.size,
        peak_units=peak,
        recomputed_layers=tuple(recomputed),
        ops=tuple(full),
    )
