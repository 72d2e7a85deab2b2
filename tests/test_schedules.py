"""Learning-rate schedules (ckpt.optim.schedules) against values computed by hand."""
import math

import pytest

from ckpt.optim.schedules import SCHEDULES, Constant, Cosine, OneCycle, make_schedule


def rates(schedule, total):
    return [schedule(step, total) for step in range(total)]


def test_constant_is_the_rate_at_every_step():
    assert rates(Constant(0.05), 7) == [0.05] * 7


def test_cosine_without_warmup():
    # T = 4: step s has (1 + cos(pi s / 4)) / 2 of lr = 2.
    assert rates(Cosine(2.0), 4) == pytest.approx([2.0, 1.0 + 2 ** -0.5, 1.0, 1.0 - 2 ** -0.5],
                                                  rel=1e-15)


def test_cosine_with_warmup():
    # T = 10, warmup 0.2: W = 2 warmup steps at 1/2 and 2/2 of lr, then the cosine over the
    # remaining 8 steps: (1 + cos(pi k / 8)) / 2 for k = 0..7.
    expected = [0.5, 1.0, 1.0, 0.9619397662556434, 0.8535533905932737, 0.6913417161825449,
                0.5, 0.3086582838174551, 0.1464466094067262, 0.0380602337443566]
    assert rates(Cosine(1.0, warmup=0.2), 10) == pytest.approx(expected, rel=1e-12)
    assert Cosine(1.0, warmup=0.2).warmup_steps(10) == 2
    assert Cosine(1.0, warmup=0.25).warmup_steps(10) == 2          # floor(2.5)


def test_cosine_decays_to_final_lr():
    # T = 2, no warmup: lr at step 0, then halfway between lr and final_lr.
    assert rates(Cosine(1.0, final_lr=0.2), 2) == pytest.approx([1.0, 0.6], rel=1e-15)


def test_onecycle_matches_the_pytorch_formulas():
    # T = 10, warmup 0.3: from 1/25 up to lr = 1 by step 0.3 * 10 - 1 = 2 (halfway at step 1:
    # (0.04 + 1) / 2), then down to 0.04 / 1e4 = 4e-6 at step 9 along (1 + cos(pi (s - 2) / 7)) / 2.
    low = 4e-6
    down = [low + (1 - low) * (1 + math.cos(math.pi * k / 7)) / 2 for k in range(1, 8)]
    assert rates(OneCycle(1.0), 10) == pytest.approx([0.04, 0.52, 1.0] + down, rel=1e-12)
    assert down[0] == pytest.approx(0.9504844, rel=1e-6)
    assert down[-1] == low


def test_onecycle_without_warmup_starts_at_the_peak_phase():
    # warmup 0: the peak sits at step -1, so the decay runs over T = 3 steps from step -1:
    # fractions 1/3, 2/3, 1 of the way from lr = 2 to 2 / 25 / 1e4.
    low = 2 / 25 / 1e4
    expected = [low + (2 - low) * (1 + math.cos(math.pi * k / 3)) / 2 for k in (1, 2, 3)]
    assert rates(OneCycle(2.0, warmup=0.0), 3) == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(1.5 + low / 4, rel=1e-12)          # cos(pi/3) = 1/2


def test_onecycle_with_a_one_step_warmup_peaks_at_step_0():
    # warmup * T - 1 = 0: the first step is the peak.
    assert OneCycle(1.0, warmup=0.25)(0, 4) == 1.0


def test_a_schedule_is_a_pure_value():
    schedule = Cosine(1e-3, warmup=0.1)
    first = rates(schedule, 50)
    assert rates(schedule, 50) == first
    assert Cosine(1e-3, warmup=0.1) == schedule
    with pytest.raises(AttributeError):
        schedule.lr = 1.0


def test_make_schedule_by_name():
    assert set(SCHEDULES) == {"constant", "cosine", "onecycle"}
    assert make_schedule("constant", 0.1) == Constant(0.1)
    assert make_schedule("cosine", 0.1) == Cosine(0.1, warmup=0.0)
    assert make_schedule("cosine", 0.1, 0.05) == Cosine(0.1, warmup=0.05)
    assert make_schedule("onecycle", 0.1) == OneCycle(0.1, warmup=0.3)
    assert make_schedule("onecycle", 0.1, 0.2).warmup == 0.2


@pytest.mark.parametrize("build, error, match", [
    (lambda: Constant(0.0), ValueError, r"lr must be a finite number in \(0, inf\], got 0.0"),
    (lambda: Constant(-1), ValueError, "lr must be"),
    (lambda: Constant(float("nan")), ValueError, "lr must be"),
    (lambda: Constant(float("inf")), ValueError, "lr must be"),
    (lambda: Constant("0.1"), TypeError, "lr must be a number, got str"),
    (lambda: Constant(True), TypeError, "lr must be a number, got bool"),
    (lambda: Cosine(0.1, warmup=1.0), ValueError, r"warmup must be a finite number in \[0, 1\)"),
    (lambda: Cosine(0.1, warmup=-0.1), ValueError, "warmup must be"),
    (lambda: Cosine(0.1, final_lr=0.2), ValueError, r"final_lr must be a finite number in "
                                                    r"\[0, 0.1\], got 0.2"),
    (lambda: OneCycle(0.1, div_factor=0.5), ValueError, "div_factor must be"),
    (lambda: OneCycle(0.1, final_div_factor=float("nan")), ValueError, "final_div_factor"),
    (lambda: make_schedule("step", 0.1), ValueError,
     "unknown learning-rate schedule 'step'; expected one of constant, cosine, onecycle"),
    (lambda: make_schedule("constant", 0.1, 0.2), ValueError, "a constant learning rate has no "
                                                              "warmup"),
])
def test_bad_arguments_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("step, total, error, match", [
    (10, 10, ValueError, r"step must be in \[0, total_steps\) = \[0, 10\), got 10"),
    (-1, 10, ValueError, "step must be at least 0, got -1"),
    (0, 0, ValueError, "total_steps must be at least 1, got 0"),
    (1.0, 10, TypeError, "step must be an integer, got float"),
    (0, True, TypeError, "total_steps must be an integer, got bool"),
])
def test_bad_steps_are_named(step, total, error, match):
    for schedule in (Constant(0.1), Cosine(0.1, 0.1), OneCycle(0.1)):
        with pytest.raises(error, match=match):
            schedule(step, total)
