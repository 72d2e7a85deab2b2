"""Checkpointing schedules: which activations to keep, what to recompute, and where it lives.

A schedule is a sequence of operations on the activations a_0 ... a_N of a chain of N elements
(a_i is the input of element i, a_N the output):

- ``("forward", i)``: compute a_{i+1} from a_i (which must be held, a_{i+1} not, and backward i
  not yet done);
- ``("backward", i)``: back-propagate through element i, in the order N-1 .. 0, once a_N has
  been computed; needs a_i and a_{i+1} held and frees a_{i+1};
- ``("free", i)``: a_i (held, i > 0) is no longer needed. a_0 is held for the whole schedule.

Only a_0 is held at the start; whatever is held at the end is released then. The *forward
phase* runs up to the first computation of a_N and the frees right after it; the *backward
phase* is the rest.

:func:`replay` is the one checker of these rules: it raises ValueError naming the first illegal
operation and measures a schedule from the elements' descriptions (:mod:`ckpt.costs`): its peak,
how often each element runs, what the forward phase leaves held. The planner, the checkpointer
and the reports all use it. :func:`compile_schedule` then places every activation, and every
operation's scratch, in one arena with static offsets (so a step allocates one block, not one per
activation) and emits the integer rows that ckpt's typed executor runs.

An element with internals (its tape, see :mod:`ckpt.costs`: a Residual block's inner
activations) either keeps them beside its output from its forward to its backward, or its
backward rebuilds them in scratch. ``keep_internals`` says which:

- ``False``: every backward rebuilds;
- ``True``: every forward keeps them (plain backprop);
- ``"auto"`` (:data:`KEEP_AUTO`): a forward keeps them when its output goes straight into the
  backward sweep: the output is held until its element's backward, and every forward reading
  it runs before the sweep moves on (no backward operation between this forward and the last
  read). That is plain backprop's outputs, the last segment of the forward phase and every
  recomputed segment -- whose backward then needs no second rebuild -- but not checkpoints,
  which wait for many backwards and are read again by a recomputation;
- positions in the schedule (a tuple of ints): exactly the forwards at those positions keep
  them (what :mod:`ckpt.plan` chooses).

A kept tape is held beside its output until that output is released; the backward that finds
it rebuilds nothing. The memory this costs is in the trace's peak like everything else.
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from numbers import Integral
from typing import Iterable, Sequence, Tuple, Union

import numpy as np

from ckpt._core import OP_CODES
from ckpt.costs import ChainCosts

Op = Tuple[str, int]
# The operations' names, defined here only: the planner, the checkpointer and the reports import
# them. The compiled executor's OP_CODES (ckpt._executor.pxi) maps each to its code; a test checks
# that the two agree.
FORWARD, BACKWARD, FREE = "forward", "backward", "free"
OP_KINDS = (FORWARD, BACKWARD, FREE)
KEEP_AUTO = "auto"
KeepInternals = Union[bool, str, Tuple[int, ...]]  # see the module docstring

# Columns of a compiled row. Offsets are in elements per batch row: the executor scales them.
ROW_KIND, ROW_INDEX, ROW_OUTPUT, ROW_RECOMPUTE, ROW_TAPE, ROW_SCRATCH = range(6)
_NONE = -1  # no block: a_N goes to the caller's output array; no tape; no scratch
_KIND_NAMES = {code: name for name, code in OP_CODES.items()}


def uniform_ops(n_layers: int, checkpoint_every: int) -> list:
    """The classic schedule of segment checkpointing (Chen et al. 2016, "Training deep nets with
    sublinear memory cost"): keep the inputs of elements 0, k, 2k, ...; in backward, recompute
    each segment once from its start, then back-propagate through it.

    k = 1 keeps everything (plain backprop); k = 0 (or k >= N) keeps only a_0. A segment of S
    elements recomputes S - 1 of them: its last element's output is the next segment's start or
    the network output, both held. Total recomputation: N - ceil(N / k) element forwards.
    """
    n, k = n_layers, checkpoint_every
    if k <= 0 or k > n:
        k = n
    starts = list(range(0, n, k))
    ops: list = []
    for i in range(n):
        ops.append((FORWARD, i))
        if i > 0 and i % k != 0:
            ops.append((FREE, i))
    for start in reversed(starts):
        end = min(start + k, n)
        for i in range(start, end - 1):
            ops.append((FORWARD, i))
        # Each backward frees its element's output; the segment start goes with the next one.
        for i in reversed(range(start, end)):
            ops.append((BACKWARD, i))
    return ops


def as_costs(chain: Union[ChainCosts, Sequence[int]]) -> ChainCosts:
    """ChainCosts as given, or those of a Dense chain with these activation widths."""
    return chain if isinstance(chain, ChainCosts) else ChainCosts.from_widths(list(chain))


@dataclass(frozen=True)
class Trace:
    """A checked schedule and what it costs, in elements per batch row.

    ``events`` has one (kind, index, recompute, released, kept) entry per operation,
    ``released`` being the activations that operation lets go (a backward's output, a free's
    target) and ``kept`` whether a forward keeps its element's internals; the releases at the
    end are in ``final_released``. ``rebuilt`` lists the elements whose backward rebuilt their
    internals (elements without internals never appear). (A compiled schedule keeps its trace
    without the ops and events: its rows hold them.)
    """

    ops: Tuple[Op, ...]
    events: Tuple[tuple, ...]
    final_released: Tuple[int, ...]
    peak_units: int
    forward_counts: Tuple[int, ...]
    forward_length: int                 # operations in the forward phase
    stored_by_first_sweep: Tuple[int, ...]   # held after the forward phase, a_N aside
    held_after_forward_units: int       # elements per row the forward phase leaves held
    recomputed: Tuple[int, ...]         # elements forwarded again, in order
    keep_internals: KeepInternals
    rebuilt: Tuple[int, ...] = ()       # elements whose backward rebuilt their internals


def check_keep_internals(keep_internals: object) -> KeepInternals:
    """True, False, :data:`KEEP_AUTO`, or a sorted tuple of distinct operation positions."""
    if keep_internals is True or keep_internals is False or keep_internals == KEEP_AUTO:
        return keep_internals
    if isinstance(keep_internals, (bool, np.bool_)):
        return bool(keep_internals)
    if isinstance(keep_internals, (tuple, list, np.ndarray)):
        positions = list(keep_internals)
        if all(isinstance(q, Integral) and not isinstance(q, (bool, np.bool_)) and q >= 0
               for q in positions) and len(set(positions)) == len(positions):
            return tuple(sorted(int(q) for q in positions))
    raise ValueError(f"keep_internals must be True, False, {KEEP_AUTO!r} or a tuple of "
                     f"distinct operation positions (ints >= 0), got {keep_internals!r}")


def _kept_at(keep_internals: KeepInternals, ops: Sequence, costs: ChainCosts) -> list:
    """Per operation, whether it is a forward that keeps its element's internals."""
    if keep_internals == KEEP_AUTO:
        return _kept_automatically(ops) if costs.has_internals else [False] * len(ops)
    if isinstance(keep_internals, tuple):
        kept = [False] * len(ops)
        for q in keep_internals:
            op = ops[q] if q < len(ops) else None
            if not (isinstance(op, tuple) and len(op) == 2 and op[0] == FORWARD):
                raise ValueError(f"keep_internals: operation {q} is {op!r}, not a forward")
            kept[q] = True
        return kept
    return [keep_internals] * len(ops)


def _kept_automatically(ops: Sequence) -> list:
    """For each operation, whether it is a forward whose output goes straight into the backward
    sweep (see the module docstring). Malformed operations are skipped: replay rejects them."""
    kept = [False] * len(ops)
    produced_at: dict = {}    # activation -> (operation that made it, backwards before it)
    spoiled: set = set()      # activations read again after a backward that followed them
    backwards = 0
    for q, op in enumerate(ops):
        try:
            kind, i = op
            i = int(i)
        except (TypeError, ValueError):
            continue
        if kind == FORWARD:
            made = produced_at.get(i)
            if made is not None and backwards > made[1]:
                spoiled.add(i)
            produced_at[i + 1] = (q, backwards)
            spoiled.discard(i + 1)
        elif kind == BACKWARD:
            made = produced_at.pop(i + 1, None)
            if made is not None and i + 1 not in spoiled:
                kept[made[0]] = True
            backwards += 1
        elif kind == FREE:
            produced_at.pop(i, None)
    return kept


def replay(ops: Iterable[Op], chain: Union[ChainCosts, Sequence[int]],
           keep_internals: KeepInternals = False) -> Trace:
    """Check a schedule against the rules of the module docstring and measure it.

    The peak counts what is held plus the scratch of the operation running (forward scratch,
    backward scratch, and a backward's internals when they were not kept).
    """
    costs = as_costs(chain)
    keep_internals = check_keep_internals(keep_internals)
    n = costs.n
    elements = costs.elements
    ops = list(ops)
    kept_at = _kept_at(keep_internals, ops, costs)
    fwd_scratch = costs.forward_scratch
    held = [False] * (n + 1)
    held[0] = True
    # What each held activation costs: its element's stored size, plus the tape when kept.
    units = [0] * (n + 1)
    units[0] = costs.widths[0]
    tape_kept = [False] * (n + 1)
    rebuilt: list = []
    current = peak = units[0]
    counts = [0] * n
    next_backward = n - 1
    full: list = []
    events: list = []
    recomputed: list = []
    forward_length = None
    for step, op in enumerate(ops):
        try:
            kind, i = op
        except (TypeError, ValueError):
            raise ValueError(f"operation {step}: {op!r} is not a (kind, index) pair") from None
        if kind not in OP_KINDS:
            raise ValueError(f"operation {step}: unknown kind {kind!r}")
        if forward_length is None and counts[n - 1] and kind != FREE:
            forward_length = len(full)
        top = n if kind == FREE else n - 1
        if not isinstance(i, Integral) or isinstance(i, bool) or not 0 <= i <= top:
            raise ValueError(f"operation {step}: {kind} {i!r} is outside a chain of {n} layers")
        i = int(i)
        if kind == FORWARD:
            if i > next_backward:
                raise ValueError(f"operation {step}: forward {i} after its backward "
                                 f"(it comes after backward {i})")
            if not held[i] or held[i + 1]:
                raise ValueError(f"operation {step}: forward {i} needs a_{i} held and "
                                 f"a_{i + 1} not")
            held[i + 1] = True
            kept = kept_at[step]
            tape_kept[i + 1] = kept and elements[i].tape > 0
            units[i + 1] = elements[i].held(tape_kept[i + 1])
            current += units[i + 1]
            peak = max(peak, current + fwd_scratch[i])
            if counts[i]:
                recomputed.append(i)
            events.append((FORWARD, i, bool(counts[i]), (), tape_kept[i + 1]))
            counts[i] += 1
        elif kind == BACKWARD:
            if not counts[n - 1]:
                raise ValueError(f"operation {step}: backward {i} before the output is computed")
            if i != next_backward:
                raise ValueError(f"operation {step}: backward {i}, expected backward "
                                 f"{next_backward}")
            if not (held[i] and held[i + 1]):
                raise ValueError(f"operation {step}: backward {i} needs a_{i} and a_{i + 1} held")
            peak = max(peak, current + elements[i].backward_transient(tape_kept[i + 1]))
            if elements[i].tape and not tape_kept[i + 1]:
                rebuilt.append(i)
            held[i + 1] = False
            current -= units[i + 1]
            next_backward -= 1
            events.append((BACKWARD, i, False, (i + 1,), False))
        else:
            if i == 0:
                raise ValueError(f"operation {step}: a_0 is held for the whole schedule")
            if not held[i]:
                raise ValueError(f"operation {step}: free {i} but a_{i} is not held")
            held[i] = False
            current -= units[i]
            events.append((FREE, i, False, (i,), False))
        full.append((kind, i))
    if next_backward >= 0:
        raise ValueError(f"the schedule ends before backward {next_backward}")
    assert forward_length is not None  # backward N-1 came after the output
    after_forward = _held_after(full[:forward_length], n)
    # What the forward phase leaves held, with the tapes its forwards kept.
    first_kept = {}
    for kind, i, _, _, kept in events[:forward_length]:
        if kind == FORWARD:
            first_kept[i + 1] = kept
    final = tuple(j for j in range(n + 1) if held[j])
    return Trace(
        ops=tuple(full), events=tuple(events), final_released=final, peak_units=peak,
        forward_counts=tuple(counts), forward_length=forward_length,
        stored_by_first_sweep=tuple(j for j in sorted(after_forward) if j < n),
        held_after_forward_units=sum(
            costs.widths[0] if j == 0 else elements[j - 1].held(first_kept.get(j, False))
            for j in after_forward),
        recomputed=tuple(recomputed), keep_internals=keep_internals, rebuilt=tuple(rebuilt))


def _held_after(ops: Sequence[Op], n: int) -> set:
    held = {0}
    for kind, i in ops:
        if kind == FORWARD:
            held.add(i + 1)
        elif kind == BACKWARD:
            held.discard(i + 1)
        else:
            held.discard(i)
    return held


class _Arena:
    """First-fit placement of blocks in one buffer, in units of batch rows."""

    def __init__(self) -> None:
        self.blocks: list = []  # sorted (start, end)
        self.size = 0

    def allocate(self, length: int) -> int:
        if length == 0:
            return _NONE
        start = 0
        for lo, hi in self.blocks:
            if lo - start >= length:
                break
            start = max(start, hi)
        bisect.insort(self.blocks, (start, start + length))
        self.size = max(self.size, start + length)
        return start

    def release(self, start: int) -> None:
        if start == _NONE:
            return
        index = next(i for i, (lo, _) in enumerate(self.blocks) if lo == start)
        del self.blocks[index]


@dataclass(frozen=True)
class CompiledSchedule:
    """A checked schedule with static arena offsets, in units of one batch row."""

    costs: ChainCosts
    trace: Trace
    forward_rows: np.ndarray   # int64 (rows, 6): see the ROW_* columns; offsets per batch row
    backward_rows: np.ndarray
    arena_units: int           # arena size per batch row, in elements

    @property
    def widths(self) -> Tuple[int, ...]:
        return self.costs.widths

    @property
    def ops(self) -> Tuple[Op, ...]:
        """The full schedule, with the final releases as explicit frees (read off the rows)."""
        rows = np.concatenate([self.forward_rows, self.backward_rows])
        return tuple((_KIND_NAMES[kind], i) for kind, i in rows[:, :2].tolist())

    @property
    def peak_units(self) -> int:
        """Most elements per batch row held at once, a_0 and scratch included."""
        return self.trace.peak_units

    @property
    def keep_internals(self) -> KeepInternals:
        return self.trace.keep_internals

    @property
    def rebuilt_layers(self) -> Tuple[int, ...]:
        """Elements whose backward rebuilds their internals (they were not kept)."""
        return self.trace.rebuilt

    @property
    def recomputed_layers(self) -> Tuple[int, ...]:
        """Elements forwarded again in the backward phase, in order."""
        return self.trace.recomputed

    @property
    def recomputed_units(self) -> int:
        """Activation elements recomputed per batch row."""
        return sum(self.costs.elements[i].stored for i in self.trace.recomputed)


def compile_schedule(ops: Iterable[Op], chain: Union[ChainCosts, Sequence[int]],
                     keep_internals: KeepInternals = False) -> CompiledSchedule:
    """Check a schedule (:func:`replay`) and place its activations and scratch in an arena.

    ``chain`` is the elements' ChainCosts, or the activation widths of a Dense chain.
    """
    costs = as_costs(chain)
    trace = replay(ops, costs, keep_internals)
    n = costs.n
    elements = costs.elements
    fwd_scratch = costs.forward_scratch
    arena = _Arena()
    tapes = {0: _NONE}     # activation -> offset of its element's tape
    owned = {0: _NONE}     # activation -> the arena block it owns (output and tape together)
    rows: list = []

    def release(j: int) -> None:
        tapes.pop(j)
        arena.release(owned.pop(j))

    for kind, i, recompute, released, kept in trace.events:
        if kind == FORWARD:
            e = elements[i]
            tape_units = e.tape if kept else 0
            if i == n - 1:        # the output goes to the caller's array
                out = _NONE
                tape = owned[i + 1] = arena.allocate(tape_units)
            else:                 # output and tape in one block
                out = owned[i + 1] = arena.allocate(e.stored + tape_units)
                tape = out + e.stored if tape_units else _NONE
            tapes[i + 1] = tape
            scratch = arena.allocate(fwd_scratch[i])
            arena.release(scratch)
            rows.append((OP_CODES[FORWARD], i, out, int(recompute), tape, scratch))
        elif kind == BACKWARD:
            scratch = arena.allocate(elements[i].backward_transient(tapes[i + 1] != _NONE))
            arena.release(scratch)
            rows.append((OP_CODES[BACKWARD], i, _NONE, 0, tapes[i + 1], scratch))
        else:
            rows.append((OP_CODES[FREE], i, _NONE, 0, _NONE, _NONE))
        for j in released:
            release(j)
    for j in trace.final_released:
        rows.append((OP_CODES[FREE], j, _NONE, 0, _NONE, _NONE))
    table = np.array(rows, dtype=np.int64).reshape(-1, 6)
    split = trace.forward_length
    return CompiledSchedule(
        # The rows say what the ops and events said: keep the trace without them.
        costs=costs, trace=dataclasses.replace(trace, ops=(), events=()),
        forward_rows=table[:split].copy(),
        backward_rows=table[split:].copy(),
        arena_units=arena.size)
