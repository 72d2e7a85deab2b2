"""The benchmark cannot rot: `bench/run.py --quick` runs every contender on tiny sizes and writes
well-formed results. Counts are asserted (rows, recomputed layers, equal starting losses, no
subnormals); timings never are."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ckpt

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_JAX = importlib.util.find_spec("jax") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)]
    if not HAVE_TORCH:
        cmd.append("--no-torch")
    env = dict(os.environ)
    # The workers must import the ckpt under test (installed in CI, src/ in a dev tree).
    env["PYTHONPATH"] = str(Path(ckpt.__file__).resolve().parent.parent) + os.pathsep + \
        env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


def test_files_written(quick_run):
    out, _ = quick_run
    md = (out / "results.md").read_text()
    assert md.startswith("# ckpt benchmark")
    assert "| workload (D×W, B) | k |" in md and "## Targets" in md
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_json_rows(quick_run):
    _, res = quick_run
    sys.path.insert(0, str(BENCH))
    import workloads as wl
    meta = res["meta"]
    assert meta["quick"] is True and meta["threads"] >= 1
    assert meta["contenders"]["ckpt"]["threadpool_info"], "threadpoolctl info is recorded"
    assert meta["ckpt_simd"] in ("baseline", "avx2", "avx512")
    expected_contenders = {"ckpt", "numpy", "torch", "jax"}
    for w in wl.QUICK:
        for k in w.intervals:
            rows = {r["contender"]: r for r in res["rows"]
                    if r["workload"] == w.name and r["checkpoint_every"] == k
                    and r["schedule"] == "uniform"}
            assert set(rows) == expected_contenders
            per_gemm = 2 * w.batch * w.width ** 2
            for name in ("ckpt", "numpy"):
                r = rows[name]
                assert r["status"] == "ok", r["note"]
                assert r["recomputed_layers"] == len(wl.uniform_recomputed_layers(w.n_elements, k))
                assert r["extra_flops"] == wl.recomputed_gemms(w, name, k) * per_gemm
                if w.kind == "mlp":
                    assert r["extra_flops"] == r["recomputed_layers"] * per_gemm
            assert rows["ckpt"]["executor"] == "compiled"
            torch_row = rows["torch"]
            assert torch_row["status"] == ("ok" if HAVE_TORCH else "skipped")
            if HAVE_TORCH:
                assert torch_row["extra_flops"] == wl.recomputed_gemms(w, "torch", k) * per_gemm
            jax_row = rows["jax"]      # the Dense MLPs only; its recomputation read from HLO
            assert jax_row["status"] == ("ok" if HAVE_JAX and w.kind == "mlp" else "skipped")
            if jax_row["status"] == "ok":
                assert jax_row["recomputed_gemms"] >= 0
                assert jax_row["extra_flops"] == jax_row["recomputed_gemms"] * per_gemm
            for r in rows.values():
                if r["status"] != "ok":
                    assert r["note"]
                    continue
                assert r["memory"]["resident_peak_bytes"] > 0       # VmHWM over a step
                t = r["time_s"]
                assert 0 < t["min"] <= t["median"] <= t["max"] and t["n"] >= 9
                assert r["memory"]["peak_bytes"] > 0
                assert r["subnormals0"] == 0 and r["subnormals_end"] == 0 and r["finite"]
            # Same initial weights and data: the same first loss everywhere.
            losses = [r["loss0"] for r in rows.values() if r["status"] == "ok"]
            np.testing.assert_allclose(losses, losses[0], rtol=1e-4)
            assert 0 < rows["ckpt"]["blas_efficiency"]
    # The planned-schedule row exists for the deep workload, run or skipped with a note.
    planned = [r for r in res["rows"] if r["schedule"] == "planned"]
    assert len(planned) == 1 and planned[0]["workload"] == "deep"
    assert planned[0]["status"] == "ok" or planned[0]["note"]
    assert {"uniform", "planned"} <= set(res["row_types"])
    # Ratios and target verdicts are reported, never asserted.
    assert res["ratios"] and all("speedup_vs_numpy" in e for e in res["ratios"])
    assert any(t["metric"] == "memory_ratio_sqrt_vs_plain" for t in res["targets"])


def test_memory_falls_with_checkpointing(quick_run):
    """A count, not a timing: at k = floor(sqrt(D)) ckpt holds less than plain backprop."""
    _, res = quick_run
    deep = {r["checkpoint_every"]: r for r in res["rows"]
            if r["workload"] == "deep" and r["contender"] == "ckpt" and r["schedule"] == "uniform"}
    assert deep[4]["memory"]["peak_bytes"] < deep[1]["memory"]["peak_bytes"]


def test_resmlp_rows(quick_run):
    """The residual workload: N = D + 3 elements, k = floor(sqrt(N)); at that k ckpt holds
    less than its plain backprop (which keeps every block's internals)."""
    _, res = quick_run
    sys.path.insert(0, str(BENCH))
    import workloads as wl
    w = next(w for w in wl.QUICK if w.kind == "resmlp")
    assert w.n_elements == w.depth + 3 and w.intervals == [1, math.isqrt(w.depth + 3)]
    rows = {r["checkpoint_every"]: r for r in res["rows"]
            if r["workload"] == w.name and r["contender"] == "ckpt"}
    assert set(rows) == set(w.intervals)
    assert all(r["kind"] == "resmlp" and r["elements"] == w.n_elements for r in rows.values())
    k = w.sqrt_k
    assert rows[k]["memory"]["peak_bytes"] < rows[1]["memory"]["peak_bytes"]
    # Recomputed segments keep their blocks' internals; only the blocks whose outputs are the
    # checkpoints that later recomputations start from (segment starts but the first and the
    # last) rebuild their body in their backward.
    starts = list(range(0, w.n_elements, k))
    rebuilt = [s - 1 for s in starts[1:-1] if 1 <= s - 1 <= w.depth]
    assert rebuilt
    assert rows[k]["recomputed_gemms"] == (
        sum(w.dense_per_element[i] for i in wl.uniform_recomputed_layers(w.n_elements, k))
        + 2 * len(rebuilt))
    assert rows[1]["recomputed_gemms"] == 0
    assert "resmlp" in {t["workload"] for t in res["targets"]}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 0])
def test_numpy_resmlp_matches_ckpt(k):
    """The NumPy contender computes what ckpt computes (float64): output and every gradient,
    under its own recomputation, with the recomputation counted as the benchmark reports it."""
    sys.path.insert(0, str(BENCH))
    import workloads as wl
    from numpy_resmlp import NumpyResMLP
    from ckpt.train import build_mlp
    w = wl.Workload("t", 5, 12, 7, kind="resmlp")
    params = [p.astype(np.float64) for p in wl.initial_resmlp_params(w)]
    rng = np.random.default_rng(3)
    for p in params:          # non-trivial LayerNorm gains and biases too
        p += 0.1 * rng.standard_normal(p.shape)
    x, t = (a.astype(np.float64) for a in wl.batch_data(w))
    layers = build_mlp(w.width, w.depth, w.width, w.width, "relu", np.float64, 0, residual=True)
    model = ckpt.SegmentCheckpointer(layers, checkpoint_every=1)
    assert [p.shape for p in model.params()] == [p.shape for p in params]
    for p, v in zip(model.params(), params):
        p[...] = v
    y = model.forward(x)
    model.backward((y - t) * (2.0 / y.size))
    net = NumpyResMLP(params, w.depth, k, dtype=np.float64)
    y_np = net.forward(x)
    np.testing.assert_allclose(y_np, y, rtol=1e-12, atol=1e-12)
    net.backward((y_np - t) * (2.0 / y.size))
    for i, (a, b) in enumerate(zip(net.gradients(), model.gradients())):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"gradient {i}")
    assert net.recomputed_layers == len(wl.uniform_recomputed_layers(w.n_elements, k))
    assert net.recomputed_gemms == wl.recomputed_gemms(w, "numpy", k)


def test_threads_mode_and_peak_fraction(quick_run):
    """Per workload and k: ckpt's resolved threads mode, ckpt's and NumPy's step at 1 thread and
    at the run's thread count (timed in the same rounds), and the fraction of the sgemm peak."""
    out, res = quick_run
    threads = res["meta"]["threads"]
    counts = {"1", str(threads)}
    peaks = res["meta"]["gemm_peak_gflops_by_threads"]
    assert set(peaks) == counts and all(g > 0 for g in peaks.values())
    assert res["ratios"]
    for e in res["ratios"]:
        assert e["mode"] in {"split", "blas"} and e["threads_mode"] in set(ckpt.threads.MODES)
        assert (e["mode"] == "split") == (e["slices"] > 1)
        assert set(e["by_threads"]) == counts
        assert e["by_threads"]["1"]["mode"] == "blas" and e["by_threads"]["1"]["slices"] == 1
        for d in e["by_threads"].values():
            assert d["ckpt_time_s"] > 0 and d["numpy_time_s"] > 0
            assert d["speedup_vs_numpy"] == pytest.approx(d["numpy_time_s"] / d["ckpt_time_s"])
            assert 0 < d["ckpt_peak_fraction"] < 1.5 and 0 < d["numpy_peak_fraction"] < 1.5
        assert e["peak_fraction"] == e["by_threads"][str(threads)]["ckpt_peak_fraction"]
    for r in res["rows"]:
        if r["status"] != "ok":
            continue
        assert r["threads"] == threads and 0 < r["peak_fraction"] < 1.5
        one = r.get("one_thread")
        if threads == 1 or r["schedule"] != "uniform" or r["contender"] not in ("ckpt", "numpy"):
            assert one is None
            continue
        assert one["status"] == "ok" and one["time_s"]["n"] >= 9
        assert one["loss0"] == pytest.approx(r["loss0"], rel=1e-4)   # the same network
        assert one["gflops_per_s"] == pytest.approx(
            r["flops"]["total"] / one["time_s"]["median"] / 1e9)
    md = (out / "results.md").read_text()
    assert "## Per workload: threads mode" in md and "ckpt mode, 1 thr." in md


def test_targets_follow_the_issues(quick_run):
    """Each target's verdict is at the ks it names: small's PyTorch target is 6× at k = 1 and
    10× at k = floor(sqrt(N)); every verdict names the issue it comes from."""
    _, res = quick_run
    sys.path.insert(0, str(BENCH))
    import workloads as wl
    small = next(w for w in wl.QUICK if w.name == "small")
    torch_targets = {t["checkpoint_every"]: t["target"] for t in res["targets"]
                     if t["workload"] == "small" and t["metric"] == "speedup_vs_torch"}
    assert torch_targets == {1: 6.0, small.sqrt_k: 10.0}
    assert all(t["source"].startswith("issue") for t in res["targets"])
    memory = [t for t in res["targets"] if t["metric"] == "memory_ratio_sqrt_vs_plain"]
    assert {(t["workload"], t["checkpoint_every"]) for t in memory} == {
        (w.name, w.sqrt_k) for w in wl.QUICK if w.name in ("deep", "resmlp")}
    for t in res["targets"]:
        assert t["met"] is None if t["value"] is None else t["met"] == (
            t["value"] >= t["target"] if t["op"] == ">=" else t["value"] <= t["target"])


def test_usable_peak_is_the_best_with_at_most_the_threads():
    sys.path.insert(0, str(BENCH))
    from run import usable_peak
    assert usable_peak({1: 80.0, 2: 1.5}, 2) == 80.0          # a loaded machine's 2-thread GEMM
    assert usable_peak({1: 80.0, 2: 150.0}, 2) == 150.0
    assert usable_peak({"1": 80.0, "2": 150.0}, 1) == 80.0    # keys as in results.json
    assert usable_peak({1: None}, 1) is None and usable_peak({}, 4) is None


@pytest.mark.parametrize("mode, threads, expected", [
    ("split", 2, ("split", 2)), ("blas", 2, ("blas", 1)), ("split", 1, ("blas", 1))])
def test_ckpt_worker_reports_the_mode_it_runs(mode, threads, expected):
    """The benchmark's ckpt contender reports the mode its SegmentCheckpointer resolves to."""
    sys.path.insert(0, str(BENCH))
    import workloads as wl
    from worker import CkptContender
    w = next(w for w in wl.QUICK if w.name == "small")
    before = ckpt.get_num_threads()
    try:
        with ckpt.threading_mode(mode):
            prep = CkptContender(threads).prepare(w, 1, "uniform")
    finally:
        ckpt.set_num_threads(before)
    assert (prep["mode"], prep["slices"]) == expected and prep["threads_mode"] == mode
