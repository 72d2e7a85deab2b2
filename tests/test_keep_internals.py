"""keep_internals="auto": a forward keeps its element's internals (tape) when its output goes
straight into the backward sweep, so recomputed segments are not rebuilt a second time.

The kept set is checked against a brute-force reading of the rule, over uniform and random legal
schedules; peaks against an independent count; the executor's gradients against plain backprop.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ckpt
from ckpt.costs import ChainCosts, ElementCost
from ckpt.schedule import KEEP_AUTO, compile_schedule, replay, uniform_ops

from test_schedule import random_legal_schedule


def chain(n: int, seed: int = 0) -> ChainCosts:
    """n elements of width 4..8, about half with internals (tapes of 3..20 per row)."""
    rng = np.random.default_rng(seed)
    width = int(rng.integers(4, 9))
    elements = []
    for _ in range(n):
        tape = int(rng.integers(3, 21)) if rng.random() < 0.6 else 0
        elements.append(ElementCost("block" if tape else "plain", width, width, stored=width,
                                    forward_flops=2 * width * width,
                                    backward_flops=4 * width * width, tape=tape,
                                    backward_scratch=int(rng.integers(0, 5))))
    return ChainCosts(elements)


def kept_by_definition(ops, n):
    """Per operation: a forward i whose output a_{i+1} is held until backward i, and read by
    forward i+1 only before any backward runs after it (brute force, quadratic)."""
    kept = []
    for p, (kind, i) in enumerate(ops):
        if kind != "forward":
            kept.append(False)
            continue
        later = ops[p + 1:]
        end = later.index(("backward", i)) if ("backward", i) in later else None
        between = later[:end] if end is not None else later
        if end is None or ("free", i + 1) in between:
            kept.append(False)
            continue
        first_backward = next((q for q, op in enumerate(between) if op[0] == "backward"),
                              len(between))
        reads = [q for q, op in enumerate(between) if op == ("forward", i + 1)]
        kept.append(all(q < first_backward for q in reads))
    return kept


def independent_peak(ops, costs, kept):
    """Peak elements per row, counted from the ops and the kept flags alone."""
    e = costs.elements
    held = {0: costs.widths[0]}
    peak = costs.widths[0]
    tape_kept = {}
    for (kind, i), keep in zip(ops, kept):
        now = sum(held.values())
        if kind == "forward":
            tape_kept[i + 1] = keep and e[i].tape > 0
            held[i + 1] = e[i].stored + (e[i].tape if tape_kept[i + 1] else 0)
            peak = max(peak, now + held[i + 1] + e[i].forward_scratch)
        elif kind == "backward":
            rebuild = 0 if tape_kept[i + 1] else e[i].tape
            peak = max(peak, now + e[i].backward_scratch + rebuild)
            del held[i + 1]
        else:
            del held[i]
    return peak


def check(ops, costs):
    trace = replay(ops, costs, KEEP_AUTO)
    n = costs.n
    expected = kept_by_definition(list(ops), n)
    got = [bool(event[4]) for event in trace.events]
    with_tape = [k and ops[p][0] == "forward" and costs.elements[ops[p][1]].tape > 0
                 for p, k in enumerate(expected)]
    assert got == with_tape
    assert trace.peak_units == independent_peak(list(ops), costs, expected)
    # Rebuilt: elements with a tape whose last forward before their backward kept none.
    rebuilt = []
    for b, (kind, i) in enumerate(ops):
        if kind == "backward" and costs.elements[i].tape:
            p = max(q for q in range(b) if ops[q] == ("forward", i))
            if not with_tape[p]:
                rebuilt.append(i)
    assert trace.rebuilt == tuple(rebuilt)
    # Compiled: a tape block exactly for the kept forwards, and each backward finds its own.
    compiled = compile_schedule(ops, costs, KEEP_AUTO)
    rows = np.concatenate([compiled.forward_rows, compiled.backward_rows])
    forward_rows = rows[rows[:, 0] == 0]
    assert [bool(t >= 0) for t in forward_rows[:, 4]] == [k for (kind, _), k in
                                                          zip(ops, with_tape) if kind == "forward"]
    tape_of = {}
    for kind, i, _, _, tape, _ in rows.tolist():
        if kind == 0:
            tape_of[i + 1] = tape
        elif kind == 1:
            assert tape == tape_of[i + 1]
    assert compiled.rebuilt_layers == trace.rebuilt
    return trace


@pytest.mark.parametrize("n", [1, 2, 5, 12, 30])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 7])
def test_uniform_schedules(n, k):
    costs = chain(n, seed=n * 10 + k)
    ops = uniform_ops(n, k)
    trace = check(ops, costs)
    kk = n if k <= 0 or k > n else k
    starts = list(range(0, n, kk))
    # Only checkpoints that a recomputation reads again after backwards ran are rebuilt: the
    # starts of the segments but the first and the last (k = 1 recomputes nothing).
    rebuilt = {s - 1 for s in starts[1:-1] if costs.elements[s - 1].tape} if kk > 1 else set()
    assert set(trace.rebuilt) == rebuilt
    peak_none = replay(ops, costs, False).peak_units
    peak_all = replay(ops, costs, True).peak_units
    assert trace.peak_units <= peak_all
    if k == 1:   # plain backprop keeps every tape
        assert trace.peak_units == peak_all and trace.rebuilt == ()
    if costs.has_internals and n > 1 and kk > 1:
        assert trace.peak_units >= peak_none


@settings(max_examples=150, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), seed=st.integers(0, 2 ** 32 - 1))
def test_random_legal_schedules(n, seed):
    ops = random_legal_schedule(np.random.default_rng(seed), n)
    check(ops, chain(n, seed=seed % 1000))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), seed=st.integers(0, 2 ** 32 - 1))
def test_kept_positions_keep_exactly_those_forwards(n, seed):
    """keep_internals as positions (what plans give): exactly the forwards there keep a tape;
    peaks against the independent count, rebuilds and the compiled tape blocks against the
    flags; the positions auto chooses give auto's trace."""
    rng = np.random.default_rng(seed)
    ops = random_legal_schedule(rng, n)
    costs = chain(n, seed=seed % 1000)
    forwards = [q for q, (kind, _) in enumerate(ops) if kind == "forward"]
    chosen = tuple(q for q in forwards if rng.random() < 0.5)
    flags = [q in chosen for q in range(len(ops))]
    trace = replay(ops, costs, chosen)
    assert trace.keep_internals == chosen
    assert [bool(event[4]) for event in trace.events] == [
        flag and costs.elements[ops[q][1]].tape > 0 for q, flag in enumerate(flags)]
    assert trace.peak_units == independent_peak(ops, costs, flags)
    rebuilt = []
    for b, (kind, i) in enumerate(ops):
        if kind == "backward" and costs.elements[i].tape:
            last = max(q for q in range(b) if ops[q] == ("forward", i))
            if not flags[last]:
                rebuilt.append(i)
    assert trace.rebuilt == tuple(rebuilt)
    compiled = compile_schedule(ops, costs, list(reversed(chosen)))
    assert compiled.rebuilt_layers == trace.rebuilt and compiled.peak_units == trace.peak_units
    forward_rows = np.concatenate([compiled.forward_rows, compiled.backward_rows])
    forward_rows = forward_rows[forward_rows[:, 0] == 0]
    assert [bool(t >= 0) for t in forward_rows[:, 4]] == [
        flags[q] and costs.elements[ops[q][1]].tape > 0 for q in forwards]
    auto = replay(ops, costs, KEEP_AUTO)
    same = replay(ops, costs, tuple(q for q, e in enumerate(auto.events) if e[4]))
    assert (same.peak_units, same.rebuilt, same.events) == \
        (auto.peak_units, auto.rebuilt, auto.events)


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="keep_internals"):
        replay(uniform_ops(3, 1), [4, 4, 4, 4], "sometimes")
    ops = uniform_ops(3, 1)   # forward 0, 1, 2, then backward 2, 1, 0
    for bad, message in [((3,), "operation 3 is \\('backward', 2\\), not a forward"),
                         ((9,), "operation 9 is None, not a forward"),
                         ((-1,), "distinct operation positions"),
                         ((1, 1), "distinct operation positions"),
                         ((True,), "distinct operation positions"),
                         ((0.0,), "distinct operation positions")]:
        with pytest.raises(ValueError, match=message):
            replay(ops, [4, 4, 4, 4], bad)
        with pytest.raises(ValueError, match=message):
            compile_schedule(ops, [4, 4, 4, 4], bad)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_checkpointer_keeps_recomputed_internals_and_matches_plain(k):
    """A residual chain with dropout: uniform k keeps the recomputed blocks' internals (fewer
    rebuilds than blocks) and its gradients are bit-equal to plain backprop's."""
    def build():
        return ckpt.build_mlp(12, 8, 16, 5, seed=3, residual=True, dropout=0.25)

    x = np.random.default_rng(0).standard_normal((10, 12)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal((10, 5)).astype(np.float32)
    results = []
    for every in (1, k):
        layers = build()
        model = ckpt.SegmentCheckpointer(layers, checkpoint_every=every, seed=7)
        compiled = model.schedule(10)
        blocks = [i for i, layer in enumerate(layers) if isinstance(layer, ckpt.Residual)]
        if every == 1:
            assert compiled.rebuilt_layers == ()
        else:
            assert set(compiled.rebuilt_layers) < set(blocks)
        y = model.forward(x)
        gx = model.backward(g)
        results.append((y.copy(), gx, [p.copy() for layer in layers
                                        for p in layer.gradients()]))
    (y1, gx1, grads1), (yk, gxk, gradsk) = results
    assert np.array_equal(y1, yk) and np.array_equal(gx1, gxk)
    assert all(np.array_equal(a, b) for a, b in zip(grads1, gradsk))
