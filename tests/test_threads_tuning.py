"""The "tuned" and "auto" modes (ckpt.tuning): the choice from injected timings (no real timing
here), the interleaving, the re-check on a new batch size and the inheritance of a smaller one,
the bit-equality filter (batch 1, bias gradients), reproducible fits whatever the choice, the
budget, the fixed modes, the process-wide thread count and T up to 64."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import ckpt
from ckpt import Dense, SegmentCheckpointer, _core
from ckpt.runners import CompiledRunner
from ckpt.threads import DEFAULT_MODE, MODES, blas_threads, requested_num_threads
from ckpt.train import build_mlp
from ckpt.tuning import PRUNE, ROUNDS, WATCH, Config, candidates, thread_counts


@pytest.fixture(autouse=True)
def _process_default_mode():
    """The suite's conftest runs tests in "blas"; these run in the process default."""
    with ckpt.threading_mode(DEFAULT_MODE):
        yield


@pytest.fixture
def threads(restore_num_threads):
    def set_threads(n):
        ckpt.set_num_threads(n)
        return n
    return set_threads


def chain(seed=0, width=24):
    rng = np.random.default_rng(seed)
    return [Dense(10, width, "relu", dtype=np.float32, rng=rng),
            Dense(width, width, "tanh", dtype=np.float32, rng=rng),
            Dense(width, 4, dtype=np.float32, rng=rng)]


class Timings:
    """The seam: records which candidate each measured step ran, answers the given seconds."""

    def __init__(self, seconds):
        self.seconds = seconds      # label -> seconds
        self.calls = []

    def __call__(self, config, measured):
        assert measured > 0         # a real step was timed; its time is replaced
        self.calls.append(config.label)
        return self.seconds[config.label]


def step(model, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 10)).astype(np.float32)
    y = model.forward(x)
    model.backward(np.ones_like(y) / batch, accumulate=False)
    model.update(0.01)


def test_the_default_mode_is_tuned_and_every_mode_is_named():
    assert DEFAULT_MODE == "tuned" and ckpt.get_threading_mode() == "tuned"
    assert set(MODES) == {"tuned", "auto", "blas", "split"}
    with pytest.raises(ValueError, match="tuned, auto, blas, split"):
        SegmentCheckpointer(chain(), 1, threads_mode="fastest")


def test_an_unknown_environment_mode_names_the_modes(monkeypatch):
    from ckpt.threads import _environment_mode
    monkeypatch.setenv("CKPT_THREADS_MODE", "fast")
    with pytest.raises(ValueError, match="CKPT_THREADS_MODE must be one of tuned, auto"):
        _environment_mode()
    monkeypatch.setenv("CKPT_THREADS_MODE", "auto")
    assert _environment_mode() == "auto"


def test_the_candidates_up_to_64_threads():
    assert thread_counts(1) == [1]
    assert thread_counts(8) == list(range(1, 9))
    assert thread_counts(12) == [1, 2, 4, 8, 12]
    assert thread_counts(64) == [1, 2, 4, 8, 16, 32, 64]
    assert candidates("tuned", 4, 32) == [Config(4), Config(1), Config(2), Config(3)]
    # auto adds the split at each count, never into more slices than rows
    assert candidates("auto", 4, 3)[4:] == [Config(4, 2), Config(4, 3)]
    assert [c.label for c in candidates("auto", 64, 1000)][7:] == [
        "split/2", "split/4", "split/8", "split/16", "split/32", "split/64"]


def test_the_fastest_is_chosen_after_interleaved_rounds_and_a_new_batch_size_is_measured(
        threads):
    threads(4)       # oversubscribed on a 2-core machine
    model = SegmentCheckpointer(chain(), 2)
    # within PRUNE of each other: all candidates run every round
    timings = Timings({"blas/4": 1.5, "blas/1": 1.9, "blas/2": 1.0, "blas/3": 1.2})
    model.threads_tuning.timing = timings
    step(model, 32)                       # the verification step: nothing timed
    assert timings.calls == []
    for _ in range(4 * ROUNDS):
        assert model.threads_tuning.report()["32 at T=4, tuned"]["chosen"] is None
        step(model, 32)
    # one step per candidate per round, the reference first, in turn
    assert timings.calls == ["blas/4", "blas/1", "blas/2", "blas/3"] * ROUNDS
    report = model.threads_tuning.report()["32 at T=4, tuned"]
    assert report["chosen"] == "blas/2" and report["threads"] == 2 and report["slices"] == 1
    assert report["excluded"] == {}
    assert {k: len(v) for k, v in report["seconds"].items()} == dict.fromkeys(
        ["blas/4", "blas/1", "blas/2", "blas/3"], ROUNDS)
    for _ in range(3):
        step(model, 32)                   # chosen: only its own steps are timed (watched)
    assert timings.calls[4 * ROUNDS:] == ["blas/2"] * 3
    assert ckpt.get_num_threads() == 4    # a tuned step puts T back

    # A larger batch size is measured again; the timings now favour three threads.
    timings.seconds = {"blas/4": 1.5, "blas/1": 1.9, "blas/2": 1.4, "blas/3": 1.0}
    timings.calls.clear()
    for _ in range(1 + 4 * ROUNDS):
        step(model, 64)
    assert timings.calls == ["blas/4", "blas/1", "blas/2", "blas/3"] * ROUNDS
    report = model.threads_tuning.report()
    assert report["64 at T=4, tuned"]["chosen"] == "blas/3"
    assert report["32 at T=4, tuned"]["chosen"] == "blas/2"

    # A smaller one (a partial last batch) inherits the next larger choice, checked, untimed.
    timings.calls.clear()
    for _ in range(3):
        step(model, 20)
    assert timings.calls == []
    small = model.threads_tuning.report()["20 at T=4, tuned"]
    assert small["inherited"] and small["chosen"] == "blas/2" and not small["measured"]

    # Another T is another measurement.
    threads(2)
    step(model, 32)
    assert "32 at T=2, tuned" in model.threads_tuning.report()


def test_a_candidate_more_than_prune_times_slower_runs_no_more_rounds(threads):
    threads(4)
    model = SegmentCheckpointer(chain(), 2)
    timings = Timings({"blas/4": 2.5, "blas/1": 1.0, "blas/2": 1.1, "blas/3": 2.1})
    model.threads_tuning.timing = timings
    for _ in range(1 + 4 + 2 * (ROUNDS - 1) + 2):
        step(model, 32)
    # round 1 measures all four; 2.5 and 2.1 are above PRUNE x 1.0: the others go on
    assert PRUNE == 2.0
    assert timings.calls == ["blas/4", "blas/1", "blas/2", "blas/3"] + \
        ["blas/1", "blas/2"] * (ROUNDS - 1) + ["blas/1"] * 2     # then the chosen is watched
    assert model.threads_tuning.report()["32 at T=4, tuned"]["chosen"] == "blas/1"


def test_a_choice_that_becomes_slow_is_measured_again(threads):
    threads(2)
    model = SegmentCheckpointer(chain(), 2)
    timings = Timings({"blas/2": 1.0, "blas/1": 1.5})
    model.threads_tuning.timing = timings
    for _ in range(1 + 2 * ROUNDS):
        step(model, 32)
    assert model.threads_tuning.report()["32 at T=2, tuned"]["chosen"] == "blas/2"
    timings.seconds["blas/2"] = 1.9          # slower, but within PRUNE x 1.0: kept
    for _ in range(WATCH):
        step(model, 32)
    report = model.threads_tuning.report()["32 at T=2, tuned"]
    assert report["chosen"] == "blas/2" and report["remeasured"] == 0
    step(model, 20)                           # a smaller batch inherits blas/2
    assert model.threads_tuning.report()["20 at T=2, tuned"]["chosen"] == "blas/2"
    timings.seconds["blas/2"] = 3.5          # another process took the second core
    for _ in range(WATCH):
        step(model, 32)
    report = model.threads_tuning.report()
    assert report["32 at T=2, tuned"]["chosen"] is None
    assert report["32 at T=2, tuned"]["remeasured"] == 1
    assert "20 at T=2, tuned" not in report   # its inheritance is dropped with the choice
    timings.calls.clear()
    for _ in range(2):
        step(model, 32)
    # round 1 again; 3.5 > PRUNE x 1.5: blas/2 is dropped and blas/1 chosen
    assert timings.calls == ["blas/2", "blas/1"]
    report = model.threads_tuning.report()["32 at T=2, tuned"]
    assert report["chosen"] == "blas/1" and report["seconds"] == {"blas/2": [3.5],
                                                                  "blas/1": [1.5]}
    step(model, 20)
    assert model.threads_tuning.report()["20 at T=2, tuned"]["chosen"] == "blas/1"


def _flip_last_bit(a):
    a.view(np.uint32 if a.dtype == np.float32 else np.uint64).flat[-1] ^= 1


@pytest.mark.parametrize("where", ["bias", "weight", "output", "input_grad"])
def test_a_candidate_not_bit_equal_to_the_reference_is_excluded(where, threads, monkeypatch):
    """At batch 1, a candidate (3 threads) made to differ in the last bit of one value -- the
    last layer's bias sum, a weight gradient, the output, the input gradient -- is excluded,
    though the injected timings make it the fastest."""
    threads(4)
    forward, backward = CompiledRunner.forward, CompiledRunner.backward

    def faulty_forward(self, *args, **kwargs):
        pending = forward(self, *args, **kwargs)
        if where == "output" and _core.get_num_threads() == 3:
            _flip_last_bit(pending.y)
        return pending

    def faulty_backward(self, *args, **kwargs):
        gi = backward(self, *args, **kwargs)
        if _core.get_num_threads() == 3:
            if where == "input_grad":
                _flip_last_bit(gi)
            elif where in ("bias", "weight"):
                last = model.layers[-1].gradients()
                _flip_last_bit(last[1] if where == "bias" else last[0])
        return gi

    monkeypatch.setattr(CompiledRunner, "forward", faulty_forward)
    monkeypatch.setattr(CompiledRunner, "backward", faulty_backward)
    model = SegmentCheckpointer(chain(), 1)
    model.threads_tuning.timing = Timings(
        {"blas/4": 4.0, "blas/1": 5.0, "blas/2": 6.0, "blas/3": 1.0})
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 10)).astype(np.float32)
    y = model.forward(x).copy()
    gx = model.backward(np.ones_like(y))
    grads = [g.copy() for g in model.gradients()]
    report = model.threads_tuning.report()["1 at T=4, tuned"]
    assert report["excluded"] == {"blas/3": "not bit-equal to the reference"}
    assert report["candidates"] == ["blas/4", "blas/1", "blas/2"]
    # the step's own results are the reference's: a fixed blas step at T = 4 gives the same bits
    ref = SegmentCheckpointer(chain(), 1, threads_mode="blas")
    assert np.array_equal(ref.forward(x), y)
    assert np.array_equal(ref.backward(np.ones_like(y)), gx)
    assert all(np.array_equal(a, b) for a, b in zip(ref.gradients(), grads))
    for _ in range(3 * ROUNDS):
        step(model, 1)
    assert model.threads_tuning.report()["1 at T=4, tuned"]["chosen"] == "blas/4"


@pytest.mark.parametrize("batch", [1, 7])
def test_the_kept_candidates_are_exactly_those_bit_equal_to_t_threads(batch, threads):
    """Unperturbed: the tuner keeps the counts whose step -- output, input gradient, weight
    and bias gradients, at batch 1 too -- this test finds bit-equal to T threads on its own."""
    threads(4)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 10)).astype(np.float32)
    g = rng.standard_normal((batch, 4)).astype(np.float32)

    def results(t):
        ckpt.set_num_threads(t)
        model = SegmentCheckpointer(chain(width=300), 1, threads_mode="blas")
        y = model.forward(x).copy()
        return [y, model.backward(g)] + [a.copy() for a in model.gradients()]

    reference = results(4)
    expected = ["blas/4"] + [f"blas/{t}" for t in (1, 2, 3)
                             if all(np.array_equal(a, b) for a, b in zip(results(t), reference))]
    ckpt.set_num_threads(4)
    model = SegmentCheckpointer(chain(width=300), 1)
    model.forward(x)
    model.backward(g)
    assert model.threads_tuning.report()[f"{batch} at T=4, tuned"]["candidates"] == expected


@pytest.mark.parametrize("T", [4, 8, 64])
def test_fits_with_the_default_policy_are_bit_identical_whatever_the_timings_choose(T, threads):
    threads(T)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 10)).astype(np.float32)
    y = rng.integers(0, 4, 100)
    favour = {"fewest": lambda c: c.threads, "most": lambda c: T + 1 - c.threads,
              "two": lambda c: abs(c.threads - 2) + 1}
    params, chosen = {}, {}
    for name, seconds in favour.items():
        model = SegmentCheckpointer(chain(), 2, seed=1)
        assert model.threads_mode is None
        model.threads_tuning.timing = lambda config, measured, s=seconds: float(s(config))
        ckpt.fit(model, X, y, epochs=10, batch_size=32, seed=2)
        params[name] = [p.copy() for p in model.params()]
        chosen[name] = model.threads_tuning.report()[f"32 at T={T}, tuned"]
        assert chosen[name]["chosen"] is not None
    kept = chosen["fewest"]["candidates"]
    assert "blas/1" in kept and "blas/2" in kept          # small GEMMs: every count agrees
    assert chosen["fewest"]["threads"] == 1 and chosen["most"]["threads"] == T
    assert chosen["two"]["threads"] == 2
    blas = SegmentCheckpointer(chain(), 2, seed=1, threads_mode="blas")
    ckpt.fit(blas, X, y, epochs=10, batch_size=32, seed=2)
    for name in favour:
        assert all(np.array_equal(a, b) for a, b in zip(params[name], blas.params()))
    assert ckpt.get_num_threads() == T


def test_auto_measures_the_split_too_and_drops_what_the_budget_cannot_hold(threads):
    threads(2)
    layers = build_mlp(10, 3, 64, 4, "relu", np.float32, seed=0)
    model = SegmentCheckpointer(layers, 2, threads_mode="auto")
    timings = Timings({"blas/2": 1.5, "blas/1": 1.2, "split/2": 1.0})
    model.threads_tuning.timing = timings
    slices = []
    for _ in range(1 + 3 * ROUNDS):
        slices.append(model.slices(32))   # what the next step runs
        step(model, 32)
    assert slices == [1] + [1, 1, 2] * ROUNDS   # the reference, then blas/2, blas/1, split/2
    assert timings.calls == ["blas/2", "blas/1", "split/2"] * ROUNDS
    assert model.threads_tuning.report()["32 at T=2, auto"]["chosen"] == "split/2"
    assert model.slices(32) == 2
    step(model, 32)
    # 40 KiB holds an unsplit step of batch 32, not the split's parameter-sized copy on top
    tight = SegmentCheckpointer(build_mlp(10, 3, 64, 4, "relu", np.float32, seed=0),
                                budget_bytes="40KiB", threads_mode="auto")
    tight.threads_tuning.timing = Timings({"blas/2": 3.0, "blas/1": 2.0})
    for _ in range(1 + 2 * ROUNDS):
        step(tight, 32)
    report = tight.threads_tuning.report()["32 at T=2, auto"]
    assert report["excluded"] == {"split/2": "its gradient copies do not fit the budget"}
    assert report["chosen"] == "blas/1"


@pytest.mark.parametrize("mode", ["blas", "split"])
def test_a_fixed_mode_measures_nothing(mode, threads):
    threads(2)
    model = SegmentCheckpointer(chain(), 1, threads_mode=mode)
    model.threads_tuning.timing = Timings({})     # any call would fail: no seconds given
    for _ in range(6):
        step(model, 16)
    assert model.threads_tuning.report() == {}
    with ckpt.threading_mode(mode):
        context = SegmentCheckpointer(chain(), 1)
        context.threads_tuning.timing = Timings({})
        step(context, 16)
        assert context.threads_tuning.report() == {}


def test_evaluation_forwards_measure_nothing(threads):
    threads(2)
    model = SegmentCheckpointer(chain(), 1)
    model.threads_tuning.timing = Timings({})
    model.set_training(False)
    model.forward(np.ones((8, 10), np.float32))
    assert model.threads_tuning.report() == {}


def test_ckpt_train_reports_the_choice_and_threads_alone_is_fixed(capsys, threads):
    import json
    from ckpt.cli import main
    threads(2)
    argv = ["train", "--epochs", "2", "--depth", "3", "--width", "16", "--json"]

    def results(extra):
        assert main(argv + extra) == 0
        return json.loads(capsys.readouterr()[0].strip().splitlines()[-1])

    tuned = results([])["threads_tuning"]
    # real timings here: the choice (and a re-measurement under load) is the machine's
    report = tuned["32 at T=2, tuned"]               # the batch size
    assert report["candidates"] == ["blas/2", "blas/1"] and report["measured"]
    assert report["chosen"] in ("blas/1", "blas/2") or report["remeasured"]
    assert tuned.get("30 at T=2, tuned", {"inherited": True})["inherited"]   # the last batch
    assert report["seconds"] and set(report["seconds"]) <= set(report["candidates"])
    assert results(["--threads", "2"])["threads_tuning"] == {}
    assert results(["--threads-mode", "blas"])["threads_tuning"] == {}
    auto = results(["--threads-mode", "auto"])["threads_tuning"]
    assert "split/2" in auto["32 at T=2, auto"]["candidates"]


def test_a_held_count_is_process_wide_and_put_back(threads):
    threads(2)
    with blas_threads(3):
        assert _core.get_num_threads() == 3 and requested_num_threads() == 2
        with blas_threads(3):
            assert _core.get_num_threads() == 3
        assert _core.get_num_threads() == 3
    assert _core.get_num_threads() == 2
    with blas_threads(1):
        ckpt.set_num_threads(4)          # changed meanwhile: kept
    assert _core.get_num_threads() == 4


def test_holders_of_another_count_take_turns(threads):
    threads(2)
    inside, seen = threading.Event(), []
    release = threading.Event()

    def holder():
        with blas_threads(1):
            inside.set()
            release.wait(10)
            seen.append(("first", _core.get_num_threads()))

    def other():
        with blas_threads(3):
            seen.append(("second", _core.get_num_threads()))

    a = threading.Thread(target=holder)
    a.start()
    inside.wait(10)
    b = threading.Thread(target=other)
    b.start()
    b.join(0.2)
    assert b.is_alive() and seen == []     # waits for the holder of 1 thread
    release.set()
    a.join(10)
    b.join(10)
    assert seen == [("first", 1), ("second", 3)]
    assert _core.get_num_threads() == 2


def test_tuned_checkpointers_in_parallel_threads_keep_their_bits(threads):
    threads(4)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((48, 10)).astype(np.float32)
    ref = SegmentCheckpointer(chain(), 2, threads_mode="blas")
    for _ in range(10):
        ref.forward(x)
        ref.backward(np.ones((48, 4), np.float32), accumulate=False)
        ref.update(0.01)
    results, errors = [], []

    def train(favour):
        try:
            model = SegmentCheckpointer(chain(), 2)
            model.threads_tuning.timing = lambda c, s: float(abs(c.threads - favour) + 1)
            for _ in range(10):
                model.forward(x)
                model.backward(np.ones((48, 4), np.float32), accumulate=False)
                model.update(0.01)
            results.append([p.copy() for p in model.params()])
        except BaseException as exc:   # reported below
            errors.append(exc)

    workers = [threading.Thread(target=train, args=(f,)) for f in (1, 2, 4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors and len(results) == 3
    for params in results:
        assert all(np.array_equal(a, b) for a, b in zip(params, ref.params()))
    assert ckpt.get_num_threads() == 4


def test_a_copy_measures_again(threads):
    import pickle
    threads(2)
    model = SegmentCheckpointer(chain(), 1)
    model.threads_tuning.timing = lambda c, s: float(c.threads)
    for _ in range(1 + 2 * ROUNDS):
        step(model, 8)
    assert model.threads_tuning.report()["8 at T=2, tuned"]["chosen"] == "blas/1"
    copy = pickle.loads(pickle.dumps(model))
    assert copy.threads_tuning.report() == {}
    step(copy, 8)
    assert "8 at T=2, tuned" in copy.threads_tuning.report()


@pytest.mark.parametrize("accumulate", [False, True])
def test_the_verification_holds_one_rerun_at_a_time(accumulate, threads):
    """A count, not a timing: the first tuned step (the step, then a rerun per candidate) holds
    at most one more output and input gradient than a fixed step -- the rerun's, beside the
    step's -- and, after a step that accumulated, one copy of the parameter gradients."""
    import tracemalloc
    threads(4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 10)).astype(np.float32)

    def first_step_peak(mode):
        model = SegmentCheckpointer(chain(width=256), 1, threads_mode=mode)
        tracemalloc.start()
        try:
            y = model.forward(x)
            model.backward(np.ones_like(y), accumulate=accumulate)
            return tracemalloc.get_traced_memory()[1], model, y
        finally:
            tracemalloc.stop()

    fixed, _, y = first_step_peak("blas")
    tuned, model, _ = first_step_peak("tuned")
    assert model.threads_tuning.report()["64 at T=4, tuned"]["candidates"] == [
        "blas/4", "blas/1", "blas/2", "blas/3"]
    copies = sum(g.nbytes for g in model.gradients()) if accumulate else 0
    assert tuned <= fixed + y.nbytes + x.nbytes + copies + 64 * 1024
