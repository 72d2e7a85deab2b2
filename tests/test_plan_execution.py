"""SegmentCheckpointer runs any plan from ckpt.plan: same gradients, memory within the plan."""
import json
from collections import Counter

import numpy as np
import pytest

import ckpt
from ckpt.cli import main
from ckpt.plan import plan, uniform_plan

UNEVEN = [24, 64, 16, 48, 48, 8, 40, 32, 12, 56, 20]


def make_layers(widths, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    acts = ["relu", "tanh", "gelu", "sigmoid", "softplus", "leaky_relu"]
    return [ckpt.Dense(widths[i], widths[i + 1], acts[i % len(acts)] if i < len(widths) - 2
                       else None, dtype=dtype, rng=rng) for i in range(len(widths) - 1)]


def step(model, x, g):
    y = model.forward(x).copy()
    grad_input = model.backward(g)
    return [y, grad_input] + [a.copy() for a in model.gradients()]


def budgets(widths, batch, dtype):
    """From the smallest feasible budget to plain backprop, a few points."""
    low = plan(widths, batch, 10**12, dtype).min_budget_bytes
    high = uniform_plan(widths, batch, 1, dtype).peak_bytes
    return sorted({low, (2 * low + high) // 3, (low + 2 * high) // 3, high})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("widths", [[32] * 13, UNEVEN], ids=["equal", "uneven"])
def test_planned_schedules_give_plain_gradients_within_their_peak(widths, dtype):
    batch = 6
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, widths[0])).astype(dtype)
    g = rng.standard_normal((batch, widths[-1])).astype(dtype)
    expected = step(ckpt.SegmentCheckpointer(make_layers(widths, dtype), 1), x, g)
    n = len(widths) - 1
    for budget in budgets(widths, batch, dtype):
        p = plan(widths, batch, budget, dtype)
        model = ckpt.SegmentCheckpointer(make_layers(widths, dtype), plan=p)
        got = step(model, x, g)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), budget
        tracker = model.memory_tracker
        # The documented constant on top of the plan's peak: the two gradient buffers.
        assert tracker.peak_bytes <= p.peak_bytes + model.gradient_workspace_bytes(batch)
        assert p.peak_bytes <= budget
        assert tracker.stored_activation_bytes == 0
        # Recomputed activations match the plan's forward counts, layer by layer.
        compiled = model.schedule(batch)
        runs = Counter(compiled.recomputed_layers)
        assert [1 + runs[i] for i in range(n)] == list(p.forward_counts)
        itemsize = np.dtype(dtype).itemsize
        assert tracker.recomputed_bytes == sum(batch * widths[i + 1] * itemsize
                                               for i in compiled.recomputed_layers)


def test_plan_beats_uniform_segments_at_the_same_budget():
    widths, batch = [256] * 65, 64
    uniform = uniform_plan(widths, batch, 8)
    best = plan(widths, batch, uniform.peak_bytes)
    assert best.recompute_flops <= uniform.recompute_flops
    assert best.peak_bytes <= uniform.peak_bytes


def residual_layers(depth=8, width=16):
    return ckpt.build_mlp(12, depth, width, 5, seed=3, residual=True, dropout=0.25)


def test_plans_keep_residual_internals_and_give_plain_gradients_within_their_peak():
    """On a residual chain (dropout included) plans keep the internals of the blocks where that
    lowers the recomputation within the budget; the executor keeps exactly those (it rebuilds
    the blocks the plan says), within the plan's peak, bit-equal to plain backprop."""
    batch = 10
    rng = np.random.default_rng(4)
    x = rng.standard_normal((batch, 12)).astype(np.float32)
    g = rng.standard_normal((batch, 5)).astype(np.float32)
    expected = step(ckpt.SegmentCheckpointer(residual_layers(), 1, seed=7), x, g)
    costs = ckpt.SegmentCheckpointer(residual_layers()).costs
    low = plan(costs, batch, 10**12).min_budget_bytes
    high = uniform_plan(costs, batch, 1).peak_bytes
    partly_kept = 0
    for budget in sorted({low, (2 * low + high) // 3, (low + 2 * high) // 3, high - 1}):
        p = plan(costs, batch, budget)
        model = ckpt.SegmentCheckpointer(residual_layers(), plan=p, seed=7)
        got = step(model, x, g)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), budget
        compiled = model.schedule(batch)
        assert compiled.rebuilt_layers == p.rebuilt_layers
        assert compiled.peak_units * batch * 4 == p.peak_bytes <= budget
        assert model.memory_tracker.peak_bytes <= p.peak_bytes + \
            model.gradient_workspace_bytes(batch)
        partly_kept += isinstance(p.keep_internals, tuple)
    assert partly_kept >= 2


@pytest.mark.parametrize("depth, width, ks", [(10, 16, range(1, 14)), (64, 256, (4, 8, 16))],
                         ids=["10 blocks", "64 blocks"])
def test_plans_never_recompute_more_than_uniform_on_residual_chains(depth, width, ks):
    """At the peak of each uniform schedule (keeping the internals the checkpointer keeps, or
    none), the plan recomputes no more than the best uniform schedule within that budget. The
    second case is the issue's resmlp (64 blocks of width 256, batch 64)."""
    batch = 64
    costs = ckpt.SegmentCheckpointer(ckpt.build_mlp(width, depth, width, width, seed=0,
                                                    residual=True)).costs
    uniform = [uniform_plan(costs, batch, k, keep_internals=keep)
               for k in range(1, costs.n + 1) for keep in ("auto", False)]
    for k in ks:
        for keep in ("auto", False):
            budget = uniform_plan(costs, batch, k, keep_internals=keep).peak_bytes
            p = plan(costs, batch, budget)
            assert p.peak_bytes <= budget
            best = min(u.recompute_flops for u in uniform if u.peak_bytes <= budget)
            assert p.recompute_flops <= best, (k, keep, p.recompute_flops, best)


def test_budget_bytes_keeps_the_tracker_within_the_budget():
    widths, batch = [16] + [64] * 20 + [10], 8
    rng = np.random.default_rng(2)
    x = rng.standard_normal((batch, 16)).astype(np.float32)
    g = rng.standard_normal((batch, 10)).astype(np.float32)
    expected = step(ckpt.SegmentCheckpointer(make_layers(widths, np.float32), 1), x, g)
    for budget in (12 * 1024, "16KiB", 40 * 1024):
        model = ckpt.SegmentCheckpointer(make_layers(widths, np.float32), budget_bytes=budget)
        got = step(model, x, g)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
        limit = ckpt.plan.parse_size(budget) if isinstance(budget, str) else budget
        assert model.memory_tracker.peak_bytes <= limit
        assert model.checkpoint_every is None and model.budget_bytes == limit


def test_budget_too_small_names_the_minimum():
    model = ckpt.SegmentCheckpointer(make_layers([16, 64, 64, 10], np.float32), budget_bytes=100)
    with pytest.raises(ValueError, match="smallest feasible budget"):
        model.forward(np.zeros((8, 16), np.float32))
    assert model.memory_tracker.peak_bytes == 0


def test_a_plan_for_other_widths_is_refused():
    p = plan([8, 8, 8], 4, 10**6)
    with pytest.raises(ValueError, match="widths"):
        ckpt.SegmentCheckpointer(make_layers([8, 8, 4]), plan=p)
    with pytest.raises(ValueError, match="at most one"):
        ckpt.SegmentCheckpointer(make_layers([8, 8, 8]), 2, plan=p)
    with pytest.raises(ValueError, match="budget_bytes"):
        ckpt.SegmentCheckpointer(make_layers([8, 8, 8]), budget_bytes=-5)


def test_cli_plan_prints_the_plan_and_the_tradeoff(capsys, tmp_path):
    png = tmp_path / "curve.png"
    assert main(["plan", "--depth", "16", "--width", "64", "--batch-size", "8",
                 "--budget", "24KiB", "--plot", str(png), "--json"]) == 0
    out = capsys.readouterr().out
    assert "forward runs" in out and "memory versus compute" in out
    result = json.loads(out.splitlines()[-1])
    assert result["peak_bytes"] <= 24 * 1024
    assert result["recompute_flops"] == plan([64] * 17, 8, 24 * 1024).recompute_flops
    costs = [row["recompute_flops"] for row in result["tradeoff"]]
    assert costs == sorted(costs, reverse=True) and costs[-1] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["plan", "--budget", "lots"], "size"),
    (["plan", "--budget", "1KiB"], "smallest feasible budget"),
    (["plan", "--widths", "8,x"], "comma-separated"),
    (["train", "--budget", "1MiB", "--checkpoint-every", "2"], "not allowed with"),
])
def test_cli_plan_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_train_under_a_budget_stays_within_it(capsys):
    assert main(["train", "--epochs", "1", "--depth", "6", "--width", "32",
                 "--budget", "40KiB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["peak_activation_bytes"] <= 40 * 1024
    assert result["peak_activation_bytes_training"] <= 40 * 1024
    assert result["budget_bytes"] == 40 * 1024
