"""Ctrl-C during a long compiled phase: it is raised within about a second, and the step is
dropped cleanly (issue 11, item 3).

``_thread.interrupt_main`` trips the SIGINT flag the way a real signal's C handler does; the
executor's poll (see _interrupt.h) must notice it between schedule rows, stop every slice, and
raise KeyboardInterrupt when the phase returns -- instead of after the whole phase.

The chain is sized from a timed single layer so that an uninterrupted phase would take several
seconds on any machine; the assertions compare the wait against that, not against a constant.
"""
import _thread
import threading
import time

import numpy as np
import pytest

import ckpt
from ckpt.checkpoint import CheckpointStateError

WIDTH = 512
BATCH = 2048
PHASE_SECONDS = 3.0   # what one uninterrupted forward should take
INTERRUPT_AFTER = 0.3
# The backward phase first recomputes the last segment: stop it later, inside the sweep.
BACKWARD_INTERRUPT_AFTER = 1.0


def _layer_seconds() -> float:
    """Seconds of one Dense forward of the test's size (best of three)."""
    layer = ckpt.Dense(WIDTH, WIDTH, "relu", rng=0)
    x = np.ones((BATCH, WIDTH), np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        layer.forward(x)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture(scope="module")
def long_chain():
    """Layers whose forward takes about PHASE_SECONDS (at most 400 layers, 400 MiB)."""
    per_layer = _layer_seconds()
    n = int(min(400, max(20, PHASE_SECONDS / per_layer)))
    rng = np.random.default_rng(0)
    # He initialisation keeps the activations of order 0.1-1 through 400 ReLU layers, so the
    # gradients of an interrupted backward are not all zero (the test needs some accumulated).
    layers = [ckpt.Dense(WIDTH, WIDTH, "relu", rng=rng) for _ in range(n)]
    return layers, n * per_layer


def _interrupt_later(delay: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), _thread.interrupt_main()))
    thread.start()
    return thread


def _grads(layers):
    return [g.copy() for layer in layers for g in layer.gradients()]


@pytest.mark.parametrize("mode", ["blas", "split"])
def test_ctrl_c_stops_a_long_forward_and_drops_the_step(long_chain, mode):
    layers, expected = long_chain
    tracker = ckpt.MemoryUsageTracker()
    model = ckpt.SegmentCheckpointer(layers, tracker=tracker, threads_mode=mode)
    x = np.random.default_rng(1).standard_normal((BATCH, WIDTH)).astype(np.float32)
    params = [p.copy() for layer in layers for p in layer.params()]
    grads = _grads(layers)
    assert model.executor == "compiled"

    thread = _interrupt_later(INTERRUPT_AFTER)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        model.forward(x)
    waited = time.perf_counter() - start
    thread.join()
    # Stopped early: well before the end of the phase (which takes `expected` seconds).
    assert waited < INTERRUPT_AFTER + max(1.0, 0.25 * expected), (waited, expected)

    # Nothing pending, nothing held, nothing changed.
    with pytest.raises(CheckpointStateError):
        model.backward(np.ones((BATCH, WIDTH), np.float32))
    assert tracker.stored_activation_bytes == 0
    assert tracker.gradient_bytes == 0
    assert all(np.array_equal(a, p) for a, p in zip(params, (p for l in layers for p in l.params())))
    assert all(np.array_equal(a, g) for a, g in zip(grads, _grads(layers)))


@pytest.mark.parametrize("mode", ["blas", "split"])
def test_ctrl_c_stops_a_long_backward_and_the_next_step_is_exact(long_chain, mode):
    """Split mode also checks the slices' gradient copies: the interrupted backward skipped the
    reduction that clears them, so the next backward must start them from zero again."""
    layers, expected = long_chain
    tracker = ckpt.MemoryUsageTracker()
    model = ckpt.SegmentCheckpointer(layers, tracker=tracker, threads_mode=mode)
    x = np.random.default_rng(2).standard_normal((BATCH, WIDTH)).astype(np.float32)
    g = np.full((BATCH, WIDTH), 1e-3, np.float32)

    model.forward(x)
    thread = _interrupt_later(BACKWARD_INTERRUPT_AFTER)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        model.backward(g, input_grad=False)
    waited = time.perf_counter() - start
    thread.join()
    # The backward phase recomputes and back-propagates: about three forwards' work.
    assert waited < BACKWARD_INTERRUPT_AFTER + max(1.0, 0.5 * expected), (waited, expected)
    assert tracker.stored_activation_bytes == 0
    assert tracker.gradient_bytes == 0
    with pytest.raises(CheckpointStateError):
        model.backward(g)
    # It was stopped inside the backward sweep, after some gradients were accumulated.
    touched = sum(bool(np.any(layer.gradients()[0])) for layer in layers)
    assert 0 < touched < len(layers)

    # The interrupted backward left partial gradients (documented): after zeroing them, the
    # next step is exactly an uninterrupted one (on a few rows, to keep the test short).
    for layer in layers:
        layer.zero_grad()
    model.forward(x[:64])
    model.backward(g[:64], input_grad=False)
    interrupted_then_run = _grads(layers)
    for layer in layers:
        layer.zero_grad()
    fresh = ckpt.SegmentCheckpointer(layers, threads_mode=mode)
    fresh.forward(x[:64])
    fresh.backward(g[:64], input_grad=False)
    assert all(np.array_equal(a, b) for a, b in zip(interrupted_then_run, _grads(layers)))
    for layer in layers:
        layer.zero_grad()


def test_a_phase_in_another_thread_runs_to_its_end(long_chain):
    """Only the main thread runs Python's signal handlers: Ctrl-C raises there (as it does
    without ckpt), and a phase running in another thread is not stopped by it."""
    layers, _ = long_chain
    part = layers[: max(3, len(layers) // 4)]
    model = ckpt.SegmentCheckpointer(part)
    x = np.random.default_rng(3).standard_normal((BATCH, WIDTH)).astype(np.float32)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("y", model.forward(x).copy()))
    worker.start()
    interrupter = _interrupt_later(0.05)
    with pytest.raises(KeyboardInterrupt):
        interrupter.join()
        time.sleep(2.0)     # the handler runs in the main thread by now at the latest
    worker.join()
    assert np.array_equal(out["y"], ckpt.SegmentCheckpointer(part).forward(x))
