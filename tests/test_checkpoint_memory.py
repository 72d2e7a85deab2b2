"""Real memory, measured with tracemalloc: N=64 Dense(256->256), batch 128, float32.

How it is measured: the model, the input and grad_output are built BEFORE tracemalloc starts,
so parameters, their gradients and the inputs are never traced. Then one warm-up step runs with
tracing on (it creates what is kept across steps: the gradient workspace, the compiled schedule
and its rows), the peak counter is reset, and a second step is measured. The traced peak of that
second step is therefore "all bytes held at the peak of one training step, buffers kept across
steps included, minus parameters, gradients and inputs" - the activation memory. A third step
counts the array-creating numpy calls made from Python and checks that nothing accumulates.

What checkpoint.py's design says a steady-state Dense-chain step allocates (one unit = one
activation, 128 x 256 x 4 B = 128 KiB):

- forward: the activation arena (CompiledSchedule.arena_units x batch values, one block for all
  stored and recomputed activations) and the returned output;
- backward: the returned grad_input; the two gradient buffers are the workspace kept across
  steps (2 units), allocated once in the first step; the arena is dropped when backward ends.

  k=1: arena 63 units (a_1..a_63) + output + grad_input + workspace 2 = 67 units
  k=8: arena 14 units (7 kept boundaries + 7 recomputed) + 1 + 1 + 2 = 18 units  -> 0.27

The tracker counts a_0 (the input) and not grad_input, which happen to cancel: it reports
(65 + 2) and (9 + 7 + 2) units.
"""
from __future__ import annotations

import gc
import sys
import tracemalloc
from collections import Counter

import numpy as np
import pytest

import ckpt
from ckpt import Dense, MemoryUsageTracker, SegmentCheckpointer

N, WIDTH, BATCH = 64, 256, 128
DTYPE = np.float32
UNIT = BATCH * WIDTH * np.dtype(DTYPE).itemsize          # one activation: 128 KiB
SLACK = 64 * 1024  # small objects kept across steps (compiled schedule, its rows, DenseChain):
#                    about 27-41 KiB here; half a unit, so no extra activation-sized array fits
NUMPY_DOMAIN = np._core.multiarray.tracemalloc_domain

# numpy functions and methods that create arrays; a step may call only the expected ones
ALLOCATING = {"empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full",
              "full_like", "array", "asarray", "ascontiguousarray", "asfortranarray", "copy",
              "astype", "concatenate", "stack", "reshape", "ravel", "flatten", "dot", "matmul",
              "frombuffer", "arange", "tile", "repeat"}


def build(k):
    rng = np.random.default_rng(0)
    layers = [Dense(WIDTH, WIDTH, "relu", dtype=DTYPE, rng=rng) for _ in range(N)]
    tracker = MemoryUsageTracker()
    model = SegmentCheckpointer(layers, k, tracker=tracker)
    x = rng.standard_normal((BATCH, WIDTH)).astype(DTYPE)
    g = rng.standard_normal((BATCH, WIDTH)).astype(DTYPE)
    return model, tracker, x, g


def numpy_blocks(snapshot):
    """Sizes of the numpy data blocks alive in a snapshot (arrays only, no Python objects)."""
    return sorted(t.size for t in snapshot.traces if t.domain == NUMPY_DOMAIN)


def count_numpy_calls(fn):
    """Run fn() and count the array-creating numpy calls made from Python on the way."""
    calls = Counter()

    def profile(frame, event, arg):
        if event == "c_call":
            name = getattr(arg, "__name__", "")
            module = getattr(arg, "__module__", None) or ""
            owner = type(getattr(arg, "__self__", None)).__name__
            if name in ALLOCATING and (module.startswith("numpy") or owner == "ndarray"):
                calls[name] += 1
        elif event == "call":
            code = frame.f_code
            if code.co_name in ALLOCATING and "numpy" in code.co_filename:
                calls[code.co_name] += 1

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return calls, result


def measure(k):
    model, tracker, x, g = build(k)
    gc.collect()
    tracemalloc.start()
    try:
        # step 1 (warm-up): creates the workspace, schedule and rows kept across steps
        y = model.forward(x)
        gi = model.backward(g)
        del y, gi
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
        kept_blocks = numpy_blocks(tracemalloc.take_snapshot())
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()

        # step 2: measured
        tracker.reset()
        tracemalloc.reset_peak()
        y = model.forward(x)
        after_forward, forward_peak = tracemalloc.get_traced_memory()
        forward_blocks = numpy_blocks(tracemalloc.take_snapshot())
        tracemalloc.reset_peak()
        gi = model.backward(g)
        after_step, backward_peak = tracemalloc.get_traced_memory()
        step_blocks = numpy_blocks(tracemalloc.take_snapshot())
        tracker_peak = tracker.peak_bytes
        tracker_after = (tracker.stored_activation_bytes, tracker.gradient_bytes)
        del y, gi
        gc.collect()

        # step 3: the numpy calls made from Python are counted; nothing accumulates
        calls_forward, y = count_numpy_calls(lambda: model.forward(x))
        calls_backward, gi = count_numpy_calls(lambda: model.backward(g))
        del y, gi
        gc.collect()
        final, _ = tracemalloc.get_traced_memory()   # (includes the two small Counters)
        final_blocks = numpy_blocks(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
    compiled = model.schedule(BATCH)
    return dict(
        k=k,
        kept=kept, kept_blocks=kept_blocks,
        after_forward=after_forward, forward_peak=forward_peak, forward_blocks=forward_blocks,
        after_step=after_step, backward_peak=backward_peak, step_blocks=step_blocks,
        peak=max(forward_peak, backward_peak),
        final=final, final_blocks=final_blocks,
        tracker_peak=tracker_peak, tracker_after=tracker_after,
        arena_bytes=compiled.arena_units * BATCH * np.dtype(DTYPE).itemsize,
        peak_units=compiled.peak_units,
        calls_forward=calls_forward, calls_backward=calls_backward,
    )


@pytest.fixture(scope="module")
def measured():
    # One BLAS thread: the figures do not depend on it (OpenBLAS's own buffers are not traced),
    # and it keeps the 6 steps of 64 GEMM-heavy layers fast on a loaded machine.
    threads = ckpt.get_num_threads()
    ckpt.set_num_threads(1)
    try:
        return {k: measure(k) for k in (1, 8)}
    finally:
        ckpt.set_num_threads(threads)


def test_checkpointing_every_8_uses_at_most_030_of_plain(measured):
    plain, ckpt8 = measured[1]["peak"], measured[8]["peak"]
    ratio = ckpt8 / plain
    assert ratio <= 0.30, f"activation memory ratio {ratio:.3f} ({ckpt8} / {plain} bytes)"
    # and it is what the design predicts: 18 vs 67 units
    assert 0.25 <= ratio


@pytest.mark.parametrize("k,units", [(1, 67), (8, 18)])
def test_measured_peak_is_the_designed_one(measured, k, units):
    m = measured[k]
    assert units * UNIT <= m["peak"] < units * UNIT + SLACK


@pytest.mark.parametrize("k", [1, 8])
def test_tracker_peak_agrees_with_measured_peak(measured, k):
    m = measured[k]
    assert abs(m["tracker_peak"] - m["peak"]) <= 0.10 * m["peak"]
    # in fact exact, in units: input + held activations + 2 gradient buffers
    assert m["tracker_peak"] == (m["peak_units"] + 2 * WIDTH) * BATCH * 4
    assert m["tracker_after"] == (0, 0)


@pytest.mark.parametrize("k,arena_units", [(1, 63), (8, 14)])
def test_a_step_allocates_only_arena_output_and_grad_input(measured, k, arena_units):
    m = measured[k]
    arena = m["arena_bytes"]
    assert arena == arena_units * UNIT
    # kept across steps: the two gradient buffers of the workspace, and small objects
    assert m["kept_blocks"][-1] == 2 * UNIT
    assert sum(m["kept_blocks"]) < 2 * UNIT + SLACK
    assert 2 * UNIT <= m["kept"] < 2 * UNIT + SLACK
    # forward: exactly two new array blocks, the arena and the output
    new_forward = Counter(m["forward_blocks"]) - Counter(m["kept_blocks"])
    assert sorted(s for s in new_forward.elements() if s >= 1024) == sorted([arena, UNIT])
    assert 0 <= m["forward_peak"] - m["kept"] - (arena + UNIT) < SLACK
    # backward: the arena is gone, the output and grad_input remain
    new_step = Counter(m["step_blocks"]) - Counter(m["kept_blocks"])
    assert sorted(s for s in new_step.elements() if s >= 1024) == [UNIT, UNIT]
    assert 0 <= m["after_step"] - m["kept"] - 2 * UNIT < SLACK
    # at the peak of backward: arena + output + grad_input and nothing else of any size
    assert 0 <= m["backward_peak"] - m["kept"] - (arena + 2 * UNIT) < SLACK
    # nothing accumulates over steps
    assert m["final_blocks"] == m["kept_blocks"]
    assert abs(m["final"] - m["kept"]) < SLACK


@pytest.mark.parametrize("k", [1, 8])
def test_numpy_calls_of_a_steady_state_step(measured, k):
    m = measured[k]
    # forward: the input is checked (no copy, it is C-contiguous), then arena and output
    assert m["calls_forward"] == Counter({"empty": 2, "ascontiguousarray": 1})
    # backward: grad_output checked (no copy), grad_input allocated; workspace reused
    assert m["calls_backward"] == Counter({"empty_like": 1, "ascontiguousarray": 1})
