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
    expected_contenders = {"ckpt", "numpy", "torch"}
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
            for r in rows.values():
                if r["status"] != "ok":
                    assert r["note"]
                    continue
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
    # ckpt rebuilds every block's body in its backward when internals are not kept
    assert rows[k]["recomputed_gemms"] == (
        sum(w.dense_per_element[i] for i in wl.uniform_recomputed_layers(w.n_elements, k))
        + 2 * w.depth)
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
