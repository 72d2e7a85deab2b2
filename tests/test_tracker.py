"""ckpt.MemoryUsageTracker: exact counts, clamped releases, the exact peak, validation, and the
atomic counters under Python threads and under nogil code."""
from __future__ import annotations

import sys
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import numpy as np

import ckpt
from ckpt import _core
from ckpt.tracker import MemoryUsageTracker


def figures(t):
    return (t.stored_activation_bytes, t.recomputed_bytes, t.gradient_bytes, t.peak_bytes)


def test_exported_and_built_on_the_atomic_counters():
    assert ckpt.MemoryUsageTracker is MemoryUsageTracker
    assert isinstance(MemoryUsageTracker(), _core.AtomicCounters)


def test_starts_at_zero():
    t = MemoryUsageTracker()
    assert figures(t) == (0, 0, 0, 0)
    assert all(type(v) is int for v in figures(t))


def test_figures_are_read_only():
    t = MemoryUsageTracker()
    for name in ("stored_activation_bytes", "recomputed_bytes", "gradient_bytes", "peak_bytes"):
        with pytest.raises(AttributeError):
            setattr(t, name, 5)
    assert figures(t) == (0, 0, 0, 0)


def test_record_and_release():
    t = MemoryUsageTracker()
    t.record_stored_activation(1000)
    t.record_gradient(300)
    t.record_recomputed(200)
    assert figures(t) == (1000, 200, 300, 1300)
    assert t.release_stored_activation(400) == 400
    assert t.release_gradient(300) == 300
    t.record_recomputed(50)
    assert figures(t) == (600, 250, 0, 1300)
    t.record_stored_activation(0)  # zero is a valid count
    assert t.release_gradient(0) == 0
    assert figures(t) == (600, 250, 0, 1300)


def test_release_clamps_at_zero_and_returns_what_was_released():
    t = MemoryUsageTracker()
    t.record_stored_activation(10)
    t.record_gradient(5)
    assert t.release_stored_activation(25) == 10
    assert t.stored_activation_bytes == 0
    assert t.release_stored_activation(1) == 0
    assert t.release_gradient(7) == 5
    assert t.release_gradient(7) == 0
    assert figures(t) == (0, 0, 0, 15)
    # an over-release must not leave "held" below zero: the next peak is exact
    t.record_stored_activation(20)
    t.record_gradient(1)
    assert figures(t) == (20, 0, 1, 21)


def test_release_of_one_kind_does_not_take_from_the_other():
    t = MemoryUsageTracker()
    t.record_gradient(100)
    assert t.release_stored_activation(100) == 0
    assert t.gradient_bytes == 100
    t.record_stored_activation(100)
    assert t.release_gradient(150) == 100
    assert t.stored_activation_bytes == 100


@pytest.mark.parametrize("events, expected_peak", [
    ([], 0),
    ([("s", 100)], 100),
    ([("s", 100), ("g", 50)], 150),
    ([("s", 100), ("-s", 100), ("s", 60)], 100),
    ([("s", 100), ("g", 50), ("-s", 100), ("s", 60), ("s", 60)], 170),
    ([("s", 100), ("-s", 100), ("g", 100), ("-g", 100), ("s", 99)], 100),
    ([("g", 10), ("s", 10), ("-g", 10), ("s", 10), ("-s", 5), ("g", 3)], 20),
    ([("r", 10**9), ("s", 1)], 1),  # recomputed bytes are not held
    ([("s", 5), ("-s", 50), ("s", 7)], 7),  # clamped release
])
def test_peak_is_the_exact_maximum_of_stored_plus_gradient(events, expected_peak):
    t = MemoryUsageTracker()
    act = {"s": t.record_stored_activation, "-s": t.release_stored_activation,
           "g": t.record_gradient, "-g": t.release_gradient, "r": t.record_recomputed}
    for kind, n in events:
        act[kind](n)
    assert t.peak_bytes == expected_peak


def test_reset():
    t = MemoryUsageTracker()
    t.record_stored_activation(10)
    t.record_gradient(20)
    t.record_recomputed(30)
    t.reset()
    assert figures(t) == (0, 0, 0, 0)
    t.record_gradient(4)
    assert figures(t) == (0, 0, 4, 4)  # the peak starts over


def test_summary_is_one_line_in_kib():
    t = MemoryUsageTracker()
    t.record_stored_activation(2048)
    t.record_recomputed(512)
    t.record_gradient(1024)
    t.release_gradient(1024)
    s = t.summary()
    assert s == ("MemoryUsage { stored_activations: 2.0 KiB, recomputed: 0.5 KiB, "
                 "gradients: 0.0 KiB, peak: 3.0 KiB }")
    assert "\n" not in s
    t.record_stored_activation(100)
    assert "stored_activations: 2.1 KiB" in t.summary()


def test_repr():
    t = MemoryUsageTracker()
    t.record_stored_activation(7)
    t.record_recomputed(3)
    t.record_gradient(2)
    assert repr(t) == ("MemoryUsageTracker(stored_activation_bytes=7, recomputed_bytes=3, "
                       "gradient_bytes=2, peak_bytes=9)")


METHODS = ["record_stored_activation", "release_stored_activation", "record_recomputed",
           "record_gradient", "release_gradient"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value, exc, message", [
    (-1, ValueError, "a byte count must be non-negative, got -1"),
    (-(2**70), ValueError, "must be non-negative"),
    (1.0, TypeError, "a byte count must be an integer, got float 1.0"),
    (1.5, TypeError, "got float 1.5"),
    (True, TypeError, "got bool True"),
    (False, TypeError, "got bool False"),
    ("10", TypeError, "got str '10'"),
    (None, TypeError, "got NoneType None"),
    (np.float64(3), TypeError, "got float64"),
], ids=["-1", "-2**70", "1.0", "1.5", "True", "False", "str", "None", "np.float64"])
def test_bad_byte_counts_raise_and_change_nothing(method, value, exc, message):
    t = MemoryUsageTracker()
    t.record_stored_activation(64)
    t.record_gradient(32)
    t.record_recomputed(16)
    before = figures(t)
    with pytest.raises(exc, match=message):
        getattr(t, method)(value)
    assert figures(t) == before


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [2**48 + 1, 2**63])
def test_huge_byte_counts_raise_and_change_nothing(method, value):
    # Capped at 2**48 so that no sum of counts can wrap the 64-bit counters.
    t = MemoryUsageTracker()
    t.record_stored_activation(64)
    before = figures(t)
    with pytest.raises(ValueError, match="at most 2\\*\\*48"):
        getattr(t, method)(value)
    assert figures(t) == before


def test_numpy_integers_are_byte_counts():
    t = MemoryUsageTracker()
    t.record_stored_activation(np.int64(10))
    t.record_gradient(np.uint16(5))
    assert t.release_stored_activation(np.int32(4)) == 4
    assert figures(t) == (6, 0, 5, 15)


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fast_gil_switching():
    """Switch threads often so that Python-level updates interleave as much as possible."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _run_threads(targets):
    barrier = threading.Barrier(len(targets))
    errors = []

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


def test_totals_are_exact_with_eight_python_threads(fast_gil_switching):
    threads, iterations = 8, 100_000
    t = MemoryUsageTracker()
    sizes = [8 * (i + 1) for i in range(threads)]  # a different size per thread
    short_releases = []

    def work(n):
        def run():
            rs, rg, rr = (t.record_stored_activation, t.record_gradient, t.record_recomputed)
            fs, fg = t.release_stored_activation, t.release_gradient
            short = 0
            for i in range(iterations):
                if i & 1:
                    rs(n)
                    rg(n)
                    rr(n)
                    short += fg(n) != n
                    short += fs(n) != n
                else:
                    rg(n)
                    rs(n)
                    short += fs(n) != n
                    short += fg(n) != n
            short_releases.append(short)
        return run

    _run_threads([work(n) for n in sizes])
    assert short_releases == [0] * threads  # nobody's bytes were taken by another thread
    assert t.stored_activation_bytes == 0
    assert t.gradient_bytes == 0
    assert t.recomputed_bytes == sum(sizes) * (iterations // 2)
    # each thread holds at most 2n at once
    assert max(2 * n for n in sizes) <= t.peak_bytes <= sum(2 * n for n in sizes)


@pytest.mark.parametrize("tracker_type", [MemoryUsageTracker, _core.AtomicCounters])
def test_totals_are_exact_under_nogil_hammering(tracker_type):
    threads, iterations, nbytes = 4, 1_000_000, 48
    t = tracker_type()
    _run_threads([lambda: _core.hammer_counters(t, iterations, nbytes)] * threads)
    assert t.recomputed_bytes == threads * iterations * nbytes
    assert t.stored_activation_bytes == 0
    assert t.gradient_bytes == 0
    assert 2 * nbytes <= t.peak_bytes <= threads * 2 * nbytes


def test_nogil_and_python_threads_together(fast_gil_switching):
    t = MemoryUsageTracker()
    t.record_stored_activation(1000)  # held throughout
    iterations = 20_000

    def python_side():
        for _ in range(iterations):
            t.record_gradient(8)
            t.record_recomputed(8)
            assert t.release_gradient(8) == 8

    def nogil_side():
        _core.hammer_counters(t, iterations * 10, 16)

    _run_threads([python_side, python_side, nogil_side, nogil_side])
    assert t.stored_activation_bytes == 1000
    assert t.gradient_bytes == 0
    assert t.recomputed_bytes == 2 * iterations * 8 + 2 * iterations * 10 * 16
    assert 1000 + 32 <= t.peak_bytes <= 1000 + 2 * 8 + 2 * 32


def test_hammer_with_no_iterations_changes_nothing():
    t = MemoryUsageTracker()
    _core.hammer_counters(t, 0, 100)
    assert figures(t) == (0, 0, 0, 0)
    _core.hammer_counters(t, 3, 100)
    assert figures(t) == (0, 300, 0, 200)


def test_hammer_needs_counters():
    with pytest.raises(TypeError):
        _core.hammer_counters(object(), 1, 1)


# --------------------------------------------------------------------------------------------
# Model-based: a random sequence of calls against a trivial Python model
# --------------------------------------------------------------------------------------------

byte_counts = st.integers(min_value=0, max_value=2**40)


class TrackerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tracker = MemoryUsageTracker()
        self.stored = self.gradient = self.recomputed = self.peak = 0

    def _held_changed(self):
        self.peak = max(self.peak, self.stored + self.gradient)

    @rule(n=byte_counts)
    def record_stored(self, n):
        self.tracker.record_stored_activation(n)
        self.stored += n
        self._held_changed()

    @rule(n=byte_counts)
    def release_stored(self, n):
        expected = min(n, self.stored)
        assert self.tracker.release_stored_activation(n) == expected
        self.stored -= expected

    @precondition(lambda self: self.stored > 0)
    @rule(data=st.data())
    def release_some_stored(self, data):
        n = data.draw(st.integers(min_value=0, max_value=self.stored))
        assert self.tracker.release_stored_activation(n) == n
        self.stored -= n

    @rule(n=byte_counts)
    def record_gradient(self, n):
        self.tracker.record_gradient(n)
        self.gradient += n
        self._held_changed()

    @rule(n=byte_counts)
    def release_gradient(self, n):
        expected = min(n, self.gradient)
        assert self.tracker.release_gradient(n) == expected
        self.gradient -= expected

    @rule(n=byte_counts)
    def record_recomputed(self, n):
        self.tracker.record_recomputed(n)
        self.recomputed += n

    @rule()
    def reset(self):
        self.tracker.reset()
        self.stored = self.gradient = self.recomputed = self.peak = 0

    @invariant()
    def figures_match_the_model(self):
        assert figures(self.tracker) == (self.stored, self.recomputed, self.gradient, self.peak)


TrackerMachine.TestCase.settings = settings(max_examples=75, stateful_step_count=40,
                                            deadline=None, database=None)
test_tracker_against_model = TrackerMachine.TestCase


def test_counters_saturate_instead_of_wrapping():
    top = 2**63 - 1
    t = MemoryUsageTracker()
    for _ in range(2**15 + 3):      # 2**15 counts of 2**48 bytes reach 2**63
        t.record_recomputed(2**48)
        t.record_stored_activation(2**48)
    assert t.recomputed_bytes == top
    assert t.stored_activation_bytes == top
    assert t.peak_bytes == top
    assert t.release_stored_activation(2**48) == 2**48
    assert t.stored_activation_bytes == top - 2**48
    assert t.peak_bytes == top and t.gradient_bytes == 0
    t.record_recomputed(1)
    assert t.recomputed_bytes == top


def test_nogil_counters_saturate_too():
    t = MemoryUsageTracker()
    _core.hammer_counters(t, 4, 2**62)     # recomputed would reach 2**64
    assert t.recomputed_bytes == 2**63 - 1
    assert t.stored_activation_bytes == t.gradient_bytes == 0
    assert t.peak_bytes == 2**63 - 1     # stored + gradients: 2**62 + 2**62 saturates
