"""Checkpointing schedules: uniform_ops, compile_schedule's legality checks, arena placement.

The arena is checked by an independent simulation: every activation placed in the arena gets an
interval [offset, offset + width); at no point may two live activations' intervals overlap, and
every interval must lie inside arena_units. peak_units and the recomputed layers are recomputed
from the operations, not taken from the compiler.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ckpt import Dense, SegmentCheckpointer
from ckpt import schedule
from ckpt._core import OP_CODES
from ckpt.schedule import CompiledSchedule, compile_schedule, uniform_ops

FORWARD, BACKWARD, FREE = (OP_CODES[kind] for kind in schedule.OP_KINDS)


def expected_recomputations(n, k):
    if k <= 0 or k >= n:
        return n - 1
    return n - math.ceil(n / k)


def simulate(compiled: CompiledSchedule):
    """Replay the compiled rows; check the arena; return (peak_units, recomputed layers)."""
    widths = compiled.widths
    n = len(widths) - 1
    rows = np.concatenate([compiled.forward_rows, compiled.backward_rows])
    assert rows.dtype == np.int64 and rows.shape[1] == 6
    assert (rows[:, 4] == -1).all() and (rows[:, 5] == -1).all()   # Dense: no tape, no scratch
    rows = rows[:, :4]
    live = {0: None}                       # activation -> (lo, hi) in the arena, or None
    ran = [0] * n
    recomputed = []
    current = peak = widths[0]
    arena_used = arena_peak = 0
    for kind, i, offset, flag in rows.tolist():
        if kind == FORWARD:
            assert i in live and i + 1 not in live
            if i == n - 1:
                assert offset == -1, "a_N goes to the caller's output, not the arena"
                interval = None
            else:
                assert offset >= 0
                interval = (offset, offset + widths[i + 1])
                assert interval[1] <= compiled.arena_units, "outside the arena"
                for other in live.values():
                    if other is not None:
                        assert interval[1] <= other[0] or other[1] <= interval[0], \
                            f"a_{i + 1} at {interval} overlaps a live activation at {other}"
            live[i + 1] = interval
            if interval is not None:
                arena_used += widths[i + 1]
                arena_peak = max(arena_peak, arena_used)
            assert flag == (1 if ran[i] else 0)
            if ran[i]:
                recomputed.append(i)
            ran[i] += 1
            current += widths[i + 1]
            peak = max(peak, current)
        elif kind == BACKWARD:
            assert i in live and i + 1 in live
            if live.pop(i + 1) is not None:
                arena_used -= widths[i + 1]
            current -= widths[i + 1]
        else:
            assert kind == FREE
            assert i in live, "the compiled rows free only what is held"
            if live.pop(i) is not None:
                arena_used -= widths[i]
            current -= widths[i]
    assert live == {}, "everything, a_0 included, is freed at the end"
    assert current == 0
    assert all(r >= 1 for r in ran)
    assert arena_peak <= compiled.arena_units
    simulate.arena_peak = arena_peak
    return peak, recomputed


def random_legal_schedule(rng, n):
    """A random legal schedule: random forwards, frees and (when possible) backwards.

    Any a_i with i > 0 may be freed before backward i - 1: it can always be recomputed from a_0.
    """
    held = {0}
    ops = []
    next_backward = n - 1
    output_done = False
    while next_backward >= 0:
        choices = [("forward", i) for i in sorted(held)
                   if i <= next_backward and i + 1 not in held]
        if output_done and next_backward in held and next_backward + 1 in held:
            choices += [("backward", next_backward)] * 4
        choices += [("free", i) for i in sorted(held) if 0 < i <= next_backward + 1]
        kind, i = choices[rng.integers(len(choices))]
        if kind == "forward":
            held.add(i + 1)
            output_done = output_done or i == n - 1
        elif kind == "backward":
            held.discard(i + 1)
            next_backward -= 1
        else:
            held.discard(i)
        ops.append((kind, i))
    return ops


# --------------------------------------------------------------------------------------------
# uniform_ops
# --------------------------------------------------------------------------------------------

def test_the_executor_codes_the_operations_that_schedules_name():
    """The operation names are defined once (ckpt.schedule); the compiled executor has a
    distinct code for each and no other, and the planner's schedules use the same names."""
    assert schedule.OP_KINDS == (schedule.FORWARD, schedule.BACKWARD, schedule.FREE) \
        == ("forward", "backward", "free")
    assert set(OP_CODES) == set(schedule.OP_KINDS)
    assert sorted(OP_CODES.values()) == list(range(len(schedule.OP_KINDS)))
    from ckpt.plan import plan
    ops = plan([4, 3, 5, 2, 6], 1, 60, method="optimal").ops
    assert {kind for kind, _ in ops} == set(schedule.OP_KINDS)


def test_uniform_ops_small_example():
    # N=5, k=2: keep a_0, a_2, a_4 (and a_5); segments [4,5) [2,4) [0,2)
    assert uniform_ops(5, 2) == [
        ("forward", 0), ("forward", 1), ("free", 1), ("forward", 2), ("forward", 3),
        ("free", 3), ("forward", 4),
        ("backward", 4),
        ("forward", 2), ("backward", 3), ("backward", 2),
        ("forward", 0), ("backward", 1), ("backward", 0),
    ]


def test_uniform_ops_k1_is_plain_backprop():
    ops = uniform_ops(4, 1)
    assert ops == [("forward", i) for i in range(4)] + [("backward", i) for i in (3, 2, 1, 0)]


@pytest.mark.parametrize("k", [0, -3, 6, 100])
def test_uniform_ops_k0_or_large_is_one_segment(k):
    ops = uniform_ops(6, k)
    assert ops == uniform_ops(6, 6)
    compiled = compile_schedule(ops, [3] * 7)
    assert compiled.recomputed_layers == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17, 32, 64])
def test_uniform_ops_counts(n):
    for k in sorted({0, 1, 2, 3, 4, 5, 7, max(1, math.isqrt(n)), n, n + 1}):
        ops = uniform_ops(n, k)
        kinds = [kind for kind, _ in ops]
        r = expected_recomputations(n, k)
        assert kinds.count("forward") == n + r
        assert kinds.count("backward") == n
        assert [i for kind, i in ops if kind == "backward"] == list(reversed(range(n)))
        compiled = compile_schedule(ops, [4] * (n + 1))
        assert len(compiled.recomputed_layers) == r
        # each layer is recomputed at most once (each segment once per backward)
        assert len(set(compiled.recomputed_layers)) == r
        kk = n if k <= 0 or k > n else k
        starts = set(range(0, n, kk))
        segment_ends = {min(s + kk, n) - 1 for s in starts}
        # the recomputed layers are exactly those that are not the last of their segment
        assert set(compiled.recomputed_layers) == set(range(n)) - segment_ends
        assert compiled.recomputed_units == 4 * r


# --------------------------------------------------------------------------------------------
# compile_schedule: the compiled form
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(1, 1), (1, 0), (2, 0), (5, 2), (8, 3), (12, 3), (17, 4),
                                 (32, 5), (64, 8), (64, 1)])
def test_compiled_uniform_schedule_is_consistent(n, k):
    rng = np.random.default_rng(n * 100 + k)
    widths = [int(w) for w in rng.integers(1, 20, n + 1)]
    compiled = compile_schedule(uniform_ops(n, k), widths)
    assert compiled.widths == tuple(widths)
    peak, recomputed = simulate(compiled)
    assert compiled.peak_units == peak
    assert compiled.recomputed_layers == tuple(recomputed)
    assert compiled.recomputed_units == sum(widths[i + 1] for i in recomputed)
    # the forward phase computes every layer once, and ends at the output
    fwd = compiled.forward_rows
    fwd_forwards = fwd[fwd[:, 0] == FORWARD]
    assert fwd_forwards[:, 1].tolist() == list(range(n))
    assert not fwd_forwards[:, 3].any()
    assert not (fwd[:, 0] == BACKWARD).any()
    # the backward phase starts with no pending free: nothing waits for backward then
    assert compiled.backward_rows[0, 0] != FREE
    # compiled ops: full form with trailing frees
    assert compiled.ops[-1] == ("free", 0)


def test_peak_units_known_values():
    # N=12, k=3, width 1: forward holds at most 6, backward 5 boundaries + 2 recomputed
    assert compile_schedule(uniform_ops(12, 3), [1] * 13).peak_units == 7
    # k=1 and k=0 both peak at N+1 (k=0 recomputes the whole chain at once)
    assert compile_schedule(uniform_ops(12, 1), [1] * 13).peak_units == 13
    assert compile_schedule(uniform_ops(12, 0), [1] * 13).peak_units == 13
    # N=64, k=8: a_0, a_8..a_56, a_64, plus 7 recomputed
    assert compile_schedule(uniform_ops(64, 8), [1] * 65).peak_units == 16
    # widths count: a_0 = 10, a_1 = 1, a_2 = 100 -> plain: 111
    assert compile_schedule(uniform_ops(2, 1), [10, 1, 100]).peak_units == 111


def test_arena_sizes():
    # k=1, uniform width: nothing is freed before backward, so the arena holds a_1..a_{N-1}
    assert compile_schedule(uniform_ops(10, 1), [3] * 11).arena_units == 27
    # N=64, k=8 with width 1: 7 kept boundaries + 7 recomputed
    assert compile_schedule(uniform_ops(64, 8), [1] * 65).arena_units == 14
    # k=0: a_1..a_{N-1} all recomputed at once
    assert compile_schedule(uniform_ops(9, 0), [2] * 10).arena_units == 16
    # equal widths: first-fit never fragments, the arena is exactly the most ever live in it
    for n, k in [(9, 3), (17, 4), (32, 5), (33, 2)]:
        compiled = compile_schedule(uniform_ops(n, k), [2] * (n + 1))
        simulate(compiled)
        assert compiled.arena_units == simulate.arena_peak


def test_frees_follow_the_one_rule_of_replay():
    # free of what is not held, or of a_0, is an error (the planner's rule, now the only one)
    with pytest.raises(ValueError, match=r"operation 1: free 2 but a_2 is not held"):
        compile_schedule([("forward", 0), ("free", 2)], [2, 2, 2])
    with pytest.raises(ValueError, match=r"a_0 is held for the whole schedule"):
        compile_schedule([("forward", 0), ("forward", 1), ("backward", 1), ("backward", 0),
                          ("free", 0)], [2, 2, 2])


def test_schedule_of_a_segment_checkpointer():
    layers = [Dense(5, 5, rng=i) for i in range(9)]
    s = SegmentCheckpointer(layers, 3)
    compiled = s.schedule(4)
    assert compiled is s.schedule(16)          # one schedule for every batch size
    assert compiled.widths == (5,) * 10
    assert compiled.recomputed_layers == (6, 7, 3, 4, 0, 1)
    assert compiled.ops == compile_schedule(uniform_ops(9, 3), [5] * 10).ops


# --------------------------------------------------------------------------------------------
# compile_schedule: illegal schedules
# --------------------------------------------------------------------------------------------

ILLEGAL = [
    ("forward of a non-held activation", 3,
     [("forward", 1)], r"operation 0: forward 1 needs a_1 held"),
    ("forward of a freed activation", 3,
     [("forward", 0), ("free", 1), ("forward", 1)], r"operation 2: forward 1 needs a_1 held"),
    ("forward onto a held activation", 2,
     [("forward", 0), ("forward", 0)], r"operation 1: forward 0 needs .* a_1 not"),
    ("backward before the output", 2,
     [("forward", 0), ("backward", 0)], r"operation 1: backward 0 before the output"),
    ("backward out of order", 2,
     [("forward", 0), ("forward", 1), ("backward", 0)], r"backward 0, expected backward 1"),
    ("backward out of order, later", 3,
     [("forward", 0), ("forward", 1), ("forward", 2), ("backward", 2), ("backward", 0)],
     r"operation 4: backward 0, expected backward 1"),
    ("backward twice", 2,
     [("forward", 0), ("forward", 1), ("backward", 1), ("backward", 1)],
     r"backward 1, expected backward 0"),
    ("backward without its input", 2,
     [("forward", 0), ("forward", 1), ("free", 1), ("backward", 1)],
     r"operation 3: backward 1 needs a_1 and a_2 held"),
    ("missing backwards", 3,
     [("forward", 0), ("forward", 1), ("forward", 2), ("backward", 2)],
     r"ends before backward 1"),
    ("no backward at all", 2, [("forward", 0), ("forward", 1)], r"ends before backward 1"),
    ("empty schedule", 1, [], r"ends before backward 0"),
    ("a_0 freed before backward 0", 2,
     [("forward", 0), ("forward", 1), ("free", 0), ("backward", 1)],
     r"operation 2: a_0 is held for the whole schedule"),
    ("forward after its backward", 2,
     [("forward", 0), ("forward", 1), ("backward", 1), ("free", 1), ("forward", 1)],
     r"forward 1 (needs|after)"),
    ("unknown kind", 2, [("forward", 0), ("jump", 1)], r"operation 1: unknown kind 'jump'"),
    ("layer out of range", 2, [("forward", 2)], r"forward 2 is outside a chain of 2 layers"),
    ("negative layer", 2, [("forward", -1)], r"outside a chain"),
    ("backward out of range", 2,
     [("forward", 0), ("forward", 1), ("backward", 2)], r"backward 2 is outside"),
    ("free out of range", 2, [("forward", 0), ("free", 3)], r"free 3 is outside"),
]


@pytest.mark.parametrize("name,n,ops,message", ILLEGAL, ids=[c[0] for c in ILLEGAL])
def test_illegal_schedules_raise(name, n, ops, message):
    with pytest.raises(ValueError, match=message):
        compile_schedule(ops, [3] * (n + 1))


def test_forward_after_its_backward_message():
    # a_1 re-created after backward 1 has run: refused explicitly
    ops = [("forward", 0), ("forward", 1), ("backward", 1), ("forward", 1)]
    with pytest.raises(ValueError, match=r"operation 3: forward 1 after its backward"):
        compile_schedule(ops, [3, 3, 3])


# --------------------------------------------------------------------------------------------
# Random legal schedules: the compiler agrees with an independent simulation
# --------------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), seed=st.integers(0, 2 ** 32 - 1),
       width_seed=st.integers(0, 2 ** 32 - 1))
def test_random_legal_schedules_compile_and_never_overlap(n, seed, width_seed):
    rng = np.random.default_rng(seed)
    ops = random_legal_schedule(rng, n)
    widths = [int(w) for w in np.random.default_rng(width_seed).integers(1, 9, n + 1)]
    compiled = compile_schedule(ops, widths)
    peak, recomputed = simulate(compiled)
    assert compiled.peak_units == peak
    assert compiled.recomputed_layers == tuple(recomputed)
    n_forward = sum(1 for kind, _ in ops if kind == "forward")
    assert len(recomputed) == n_forward - n
    # compiled ops are the input plus the trailing frees
    assert [op for op in compiled.ops if op[0] != "free"] == \
        [op for op in ops if op[0] != "free"]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(n=st.integers(1, 40), k=st.integers(0, 45), width_seed=st.integers(0, 2 ** 32 - 1))
def test_uniform_schedules_never_overlap(n, k, width_seed):
    widths = [int(w) for w in np.random.default_rng(width_seed).integers(1, 30, n + 1)]
    compiled = compile_schedule(uniform_ops(n, k), widths)
    peak, recomputed = simulate(compiled)
    assert compiled.peak_units == peak
    assert len(recomputed) == expected_recomputations(n, k)
