"""Benchmark ckpt against pure NumPy and PyTorch on Dense-layer chains and a residual MLP.

    python bench/run.py [--quick] [--out bench/results | --docs] [--threads N] [--rounds R]
                        [--workloads small,deep] [--no-torch] [--render-only]

Writes OUT/results.md (tables), OUT/results.json (everything, with threadpoolctl's view of the
BLAS of every contender) and OUT/results.png (step time and memory per workload and contender).
With --docs, OUT is docs/benchmarks/results, which the documentation's benchmark page includes
(commit the three files; the docs build never runs the benchmark).

Workloads (bench/workloads.py), MSE, SGD, batch B, float32; one step is forward + backward +
update: float32 ReLU MLPs of D layers W -> W (last layer linear), and ``resmlp``, the pre-norm
residual MLP of ckpt.build_mlp(residual=True) with D blocks (LayerNorm, Dense, ReLU, Dense, skip)
between an input projection and a LayerNorm + output Dense (D + 3 chain elements, a block being
one). Each runs at checkpoint_every=1 (plain backprop; for resmlp every block's internals kept)
and at floor(sqrt(N)) for N chain elements. Contenders: ckpt (SegmentCheckpointer;
backward(accumulate=False), which sets the gradients as NumPy's step does, then model.update),
the same segments in NumPy (bench/numpy_mlp.py,
bench/numpy_resmlp.py), PyTorch (nn.Sequential, checkpoint_sequential with the same number of
segments, SGD) when importable. Each contender runs in its own process
(bench/worker.py); they take turns in rounds (A B C A B C ...); a round is at least
--round-seconds of steps. Times are the median, min and max over all timed steps after warm-up.

The full run unsets OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for the contenders (so OpenBLAS picks
its kernel for this CPU) and records what runs; --quick (tiny sizes, a few seconds; run by
tests/test_bench.py) leaves the environment as it is. Every contender gets the same thread count
(default: all cores). With more than one thread, ckpt and NumPy also run in one-thread processes
that take their turn in the same rounds (uniform schedules), and ckpt's BLAS is timed on one
large float32 GEMM at both counts, for the step's fraction of that peak. ckpt's threads mode
(split or blas) is the one its SegmentCheckpointer resolves to: set CKPT_THREADS_MODE to ask
for one.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS_RESULTS = ROOT / "docs" / "benchmarks" / "results"
sys.path.insert(0, str(HERE))

import workloads as wl  # noqa: E402


class Target(NamedTuple):
    """A target of the issues: ``metric op threshold`` at the ks it names ("every": each k
    benchmarked, "plain": k = 1, "sqrt": k = floor(sqrt(N)) > 1), from the issue ``source``."""
    metric: str
    op: str
    threshold: float
    ks: str = "every"
    source: str = ""


# Where two issues set a target on the same metric and k, the later issue's stands (issue 12
# refined small's PyTorch target from 10x at every k to 6x at k = 1 and 10x at k = 8).
TARGETS = {
    "small": [Target("speedup_vs_numpy", ">=", 3.5, "every", "issue 12"),
              Target("speedup_vs_torch", ">=", 6.0, "plain", "issue 12"),
              Target("speedup_vs_torch", ">=", 10.0, "sqrt", "issues 5, 12")],
    "medium": [Target("speedup_vs_numpy", ">=", 1.5, "every", "issues 5, 12"),
               Target("speedup_vs_torch", ">=", 1.5, "every", "issues 5, 12")],
    "large": [Target("speedup_vs_numpy", ">=", 1.1, "every", "issues 5, 12"),
              Target("speedup_vs_torch", ">=", 1.0, "every", "issue 5"),
              Target("blas_efficiency", ">=", 0.90, "every", "issues 5, 12")],
    "deep": [Target("speedup_vs_numpy", ">=", 1.3, "every", "issue 12"),
             Target("memory_ratio_sqrt_vs_plain", "<=", 0.15, "sqrt", "issue 5")],
    "resmlp": [Target("speedup_vs_numpy", ">=", 1.3, "every", "issue 9"),
               Target("speedup_vs_torch", ">=", 1.5, "every", "issue 9"),
               Target("memory_ratio_sqrt_vs_plain", "<=", 0.2, "sqrt", "issue 9")],
}


def _target_applies(target: Target, k: int) -> bool:
    return target.ks == "every" or (target.ks == "plain") == (k == 1)


CONTENDER_LABELS = {"ckpt": "ckpt", "numpy": "NumPy", "torch": "PyTorch", "jax": "JAX",
                    "ckpt-planned": "ckpt (planned)"}
COLORS = {"ckpt": "#1f77b4", "numpy": "#ff7f0e", "torch": "#d62728", "jax": "#9467bd",
          "ckpt-planned": "#2ca02c"}


# ------------------------------------------------------------------------------------ workers
class WorkerError(RuntimeError):
    pass


class Worker:
    """A contender's process; one JSON line per command and per answer."""

    def __init__(self, contender: str, env: dict, log) -> None:
        self.contender = contender
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py"), contender],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     env=env, text=True, bufsize=1)

    def call(self, **msg) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise WorkerError(f"the {self.contender} worker has exited") from exc
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"the {self.contender} worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="quit")
            except (WorkerError, OSError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def worker_env(threads: int, unset_blas_env: bool) -> dict:
    # The workers import the ckpt this interpreter imports (the installed package; set
    # PYTHONPATH=src to measure an in-place build).
    env = dict(os.environ)
    if unset_blas_env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["CKPT_BENCH_THREADS"] = str(threads)
    return env


# ------------------------------------------------------------------------------------ stats
def summary(xs) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size)}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ------------------------------------------------------------------------------------ the run
def single_thread_key(key: str) -> str:
    """The workers dict's key of a contender's one-thread process."""
    return f"{key}@1"


def _setup_message(w: wl.Workload, k: int, variant: str, args) -> dict:
    return dict(cmd="setup", workload=w.as_dict(), k=k, variant=variant,
                warm_steps=args.warm_steps, warm_seconds=args.warm_seconds,
                round_seconds=args.round_seconds, min_steps=args.min_steps,
                max_steps=args.max_steps)


def _mode_fields(prep: dict) -> dict:
    """ckpt's threads mode as its worker reported it (other contenders report none)."""
    return {key: prep[key] for key in ("threads_mode", "mode", "slices", "threads_tuning")
            if key in prep}


def run_config(w: wl.Workload, k: int, entries, workers, args, log_note) -> list:
    """Set up every contender for (w, k), time them in alternating rounds; one row each.

    Every row is timed at args.threads threads. For a uniform row whose contender has a
    one-thread process in ``workers`` (key ``single_thread_key(key)``), that process is timed in
    the same rounds, into the row's ``one_thread``."""
    rows = []
    timed = []     # (row, worker, record): record receives the timings
    for key, contender, variant in entries:
        row = {"workload": w.name, "kind": w.kind, "depth": w.depth, "width": w.width,
               "batch": w.batch, "elements": w.n_elements, "checkpoint_every": k, "schedule": variant, "contender": key, "status": "ok",
               "note": None, "threads": args.threads}
        rows.append(row)
        worker = workers.get(key)
        if worker is None:
            row.update(status="skipped", note=log_note.get(key, "not available"))
            continue
        resp = worker.call(**_setup_message(w, k, variant, args))
        if not resp["ok"]:
            why = resp["error"]
            if variant == "planned":
                why = f"no usable ckpt.plan ({why}); row left for when it exists"
            row.update(status="skipped", note=why)
            continue
        prep = resp["prepare"]
        row.update(note=prep.get("note"), recomputed_layers=prep["recomputed_layers"],
                   loss0=resp["loss0"], subnormals0=resp["subnormals0"], memory=resp["memory"],
                   warmup_steps=resp["warmup_steps"], steps_per_round=resp["steps_per_round"])
        row.update(_mode_fields(prep))
        for extra in ("budget_bytes", "schedule_peak_bytes", "segments", "executor",
                      "recomputed_gemms"):
            if extra in prep:
                row[extra] = prep[extra]
        timed.append((row, worker, row))
        one = workers.get(single_thread_key(key))
        if one is None or variant != "uniform" or args.threads == 1:
            continue
        resp = one.call(**_setup_message(w, k, variant, args))
        if not resp["ok"]:
            row["one_thread"] = {"status": "skipped", "note": resp["error"]}
            continue
        record = {"status": "ok", "threads": 1, "loss0": resp["loss0"],
                  "steps_per_round": resp["steps_per_round"], **_mode_fields(resp["prepare"])}
        row["one_thread"] = record
        timed.append((row, one, record))
    for _, _, record in timed:
        record["_steps"], record["_gemm"], record["_rounds"], record["_gemm_rounds"] = \
            [], [], [], []
    for _ in range(args.rounds):
        for row, worker, record in timed:
            # The GEMM-only sequence (BLAS efficiency) is timed at args.threads only.
            resp = worker.call(cmd="run", steps=record["steps_per_round"],
                               gemm=record is row)
            if not resp["ok"]:
                raise WorkerError(f"{row['contender']}: {resp['error']}\n{resp.get('traceback')}")
            record["_steps"] += resp["steps"]
            record["_rounds"].append(float(np.median(resp["steps"])))
            if resp["gemm"]:
                record["_gemm"] += resp["gemm"]
                record["_gemm_rounds"].append(float(np.median(resp["gemm"])))
            time.sleep(args.gap)   # let this process's BLAS threads stop spinning
    for _, _, record in timed:
        record["time_s"] = summary(record.pop("_steps"))
        record["round_medians_s"] = record.pop("_rounds")
    for row, worker, record in timed:
        gemm = record.pop("_gemm")
        gemm_rounds = record.pop("_gemm_rounds")
        if record is not row:
            continue
        resp = worker.call(cmd="check")
        row.update(loss_end=resp["loss"], subnormals_end=resp["subnormals"],
                   finite=resp["finite"])
        if gemm:
            row["gemm_time_s"] = summary(gemm)
            row["blas_efficiency"] = row["gemm_time_s"]["median"] / row["time_s"]["median"]
            per_round = [g / s for g, s in zip(gemm_rounds, row["round_medians_s"])]
            row["blas_efficiency_range"] = [min(per_round), max(per_round)]
        if row["contender"] == "torch":
            assert len(wl.torch_recomputed_layers(w.n_elements, k)) == row["recomputed_layers"]
        row["flops"] = wl.gemm_flops(w, row["recomputed_gemms"])
        row["extra_flops"] = row["flops"]["recompute"]
        row["gflops_per_s"] = row["flops"]["total"] / row["time_s"]["median"] / 1e9
        one = row.get("one_thread")
        if one and one["status"] == "ok":
            one["gflops_per_s"] = row["flops"]["total"] / one["time_s"]["median"] / 1e9
    return rows


def derive(rows: list, quick: bool, peaks: Optional[dict] = None) -> tuple:
    """Speed ratios, memory ratios, fractions of the sgemm peak and the targets' verdicts.

    ``peaks`` maps a thread count to the GFLOP/s of the large float32 GEMM measured at that
    count; every timed row (and its one-thread record) gets ``peak_fraction`` = its GEMM FLOP/s
    over :func:`usable_peak` at its thread count."""
    peaks = peaks or {}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["peak_fraction"] = _fraction(r["gflops_per_s"], usable_peak(peaks, r["threads"]))
        one = r.get("one_thread")
        if one and one["status"] == "ok":
            one["peak_fraction"] = _fraction(one["gflops_per_s"], usable_peak(peaks, 1))
    by = {(r["workload"], r["checkpoint_every"], r["schedule"], r["contender"]): r for r in rows}
    ratios = []
    for r in rows:
        if r["contender"] != "ckpt" or r["schedule"] != "uniform" or r["status"] != "ok":
            continue
        entry = {"workload": r["workload"], "checkpoint_every": r["checkpoint_every"]}
        for other in ("numpy", "torch", "jax"):
            o = by.get((r["workload"], r["checkpoint_every"], "uniform", other))
            if o is None or o["status"] != "ok":
                entry[f"speedup_vs_{other}"] = None
                continue
            entry[f"speedup_vs_{other}"] = o["time_s"]["median"] / r["time_s"]["median"]
            entry[f"speedup_vs_{other}_range"] = _round_ratio_range(o, r)
            # the best-case (least disturbed) times: a second view on a busy machine
            entry[f"speedup_vs_{other}_from_min"] = o["time_s"]["min"] / r["time_s"]["min"]
        entry["blas_efficiency"] = r.get("blas_efficiency")
        if r.get("gemm_time_s"):
            entry["blas_efficiency_from_min"] = r["gemm_time_s"]["min"] / r["time_s"]["min"]
        entry.update(_mode_fields(r), peak_fraction=r["peak_fraction"],
                     by_threads=_by_threads(r, by.get((r["workload"], r["checkpoint_every"],
                                                       "uniform", "numpy"))))
        ratios.append(entry)
    # memory relative to plain backprop (k = 1) of the same contender
    for r in rows:
        if r["status"] != "ok":
            continue
        plain = by.get((r["workload"], 1, "uniform", "torch" if r["contender"] == "torch"
                        else r["contender"].replace("-planned", "")))
        if plain is not None and plain["status"] == "ok":
            r["memory_ratio_vs_plain"] = r["memory"]["peak_bytes"] / plain["memory"]["peak_bytes"]
    targets = []
    for entry in ratios:
        name, k = entry["workload"], entry["checkpoint_every"]
        for t in TARGETS.get(name, []):
            if t.metric == "memory_ratio_sqrt_vs_plain" or not _target_applies(t, k):
                continue
            value = entry.get(t.metric)
            targets.append(_verdict(name, k, t, value, entry.get(f"{t.metric}_from_min")))
    for r in rows:
        if r["contender"] != "ckpt" or r["schedule"] != "uniform" or r["checkpoint_every"] == 1:
            continue
        for t in TARGETS.get(r["workload"], []):
            if t.metric == "memory_ratio_sqrt_vs_plain":
                targets.append(_verdict(r["workload"], r["checkpoint_every"], t,
                                        r.get("memory_ratio_vs_plain")))
    if quick:
        for t in targets:
            t["note"] = "quick mode: tiny sizes, the targets do not apply"
    return ratios, targets


def usable_peak(peaks: dict, threads: int) -> Optional[float]:
    """The peak GFLOP/s with up to ``threads`` threads: the best measured at any count <= threads
    (T threads can do what one does; on a loaded machine OpenBLAS's T-thread GEMM can measure
    slower than its one-thread GEMM, and the step is compared with the better)."""
    measured = [g for t, g in peaks.items() if int(t) <= threads and g]
    return max(measured) if measured else None


def _fraction(gflops: float, peak: Optional[float]) -> Optional[float]:
    return gflops / peak if peak else None


def _round_ratio_range(other: dict, ckpt_record: dict) -> list:
    """min and max of other / ckpt over the paired rounds (same moment, alternating)."""
    per_round = [a / b for a, b in zip(other["round_medians_s"], ckpt_record["round_medians_s"])]
    return [min(per_round), max(per_round)]


def _by_threads(ckpt_row: dict, numpy_row: Optional[dict]) -> dict:
    """ckpt's and NumPy's step at 1 thread and at the run's thread count, side by side:
    {"1": {...}, "T": {...}} keyed by the thread count as a string."""
    out = {}
    pairs = [(ckpt_row["threads"], ckpt_row, numpy_row)]
    one_ckpt, one_numpy = ckpt_row.get("one_thread"), (numpy_row or {}).get("one_thread")
    if one_ckpt and one_ckpt["status"] == "ok":
        pairs.insert(0, (1, one_ckpt, one_numpy if one_numpy and one_numpy["status"] == "ok"
                         else None))
    for threads, c, n in pairs:
        if n is not None and n.get("status") != "ok":
            n = None
        d = {"ckpt_time_s": c["time_s"]["median"], "ckpt_peak_fraction": c.get("peak_fraction"),
             **_mode_fields(c),
             "numpy_time_s": None if n is None else n["time_s"]["median"],
             "numpy_peak_fraction": None if n is None else n.get("peak_fraction"),
             "speedup_vs_numpy": None if n is None
             else n["time_s"]["median"] / c["time_s"]["median"]}
        if n is not None:
            d["speedup_vs_numpy_range"] = _round_ratio_range(n, c)
        out[str(threads)] = d
    if len(out) == 2:
        one, many = out["1"], out[str(ckpt_row["threads"])]
        for who in ("ckpt", "numpy"):
            if one[f"{who}_time_s"] and many[f"{who}_time_s"]:
                many[f"{who}_speedup_vs_1_thread"] = one[f"{who}_time_s"] / many[f"{who}_time_s"]
    return out


def _verdict(workload: str, k: int, t: Target, value: Optional[float],
             value_from_min: Optional[float] = None) -> dict:
    d = {"workload": workload, "checkpoint_every": k, "metric": t.metric, "op": t.op,
         "target": t.threshold, "value": value, "source": t.source,
         "met": None if value is None else _compare(value, t.op, t.threshold)}
    if t.metric != "memory_ratio_sqrt_vs_plain":
        d["value_from_min_times"] = value_from_min
    return d


def _compare(value: float, op: str, threshold: float) -> bool:
    return value >= threshold if op == ">=" else value <= threshold


# ------------------------------------------------------------------------------------ output
def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}" if s < 1 else f"{s * 1e3:.0f}"


def _mib(b) -> str:
    return "–" if b is None else f"{b / 2 ** 20:.2f}"


def _shape(r: dict) -> str:
    """"D×W", or "D blocks×W" for the residual MLP (rows of older results have no kind)."""
    if r.get("kind", "mlp") == "resmlp":
        return f"{r['depth']} blocks×{r['width']}"
    return f"{r['depth']}×{r['width']}"


def write_markdown(path: Path, result: dict) -> None:
    meta = result["meta"]
    L = ["# ckpt benchmark: step time and memory", ""]
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Date: {meta['date']}; machine: {meta['cpu']} ({meta['cpu_count']} cores); "
             f"threads per contender: {meta['threads']}; mode: {'quick' if meta['quick'] else 'full'}  ")
    L.append(f"Timing: {meta['rounds']} alternating rounds per configuration, each contender in "
             f"its own process; median [min–max] over all timed steps after warm-up.  ")
    L.append(f"Environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE "
             f"{'unset' if meta['unset_blas_env'] else 'left as found'} for the contenders. "
             f"BLAS: {meta['blas_summary']}  ")
    if meta.get("load_average_before_after"):
        before, after = meta["load_average_before_after"]
        L.append(f"Load average (1 min) before / after: {before[0]:.2f} / {after[0]:.2f} "
                 f"(other work on the machine shares the cores; compare ratios, not absolute "
                 f"times).  ")
    if meta.get("gemm_peak_gflops"):
        L.append(f"ckpt's BLAS on one {meta['gemm_peak_n']}³ float32 GEMM: "
                 f"{meta['gemm_peak_gflops']:.0f} GFLOP/s (the machine's practical peak).")
    L += ["", "![Step time and peak memory per workload and contender](results.png)",
          "", "## Results", "",
          "| workload (D×W, B) | k | schedule | contender | step ms median [min–max] | "
          "ckpt × faster | BLAS eff. | GFLOP/s | peak mem MiB | mem vs k=1 | recomputed elements | "
          "extra GFLOP | notes |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratio_by = {(e["workload"], e["checkpoint_every"]): e for e in result["ratios"]}
    for r in result["rows"]:
        wname = f"{r['workload']} ({_shape(r)}, {r['batch']})"
        label = CONTENDER_LABELS.get(r["contender"], r["contender"])
        if r["status"] != "ok":
            L.append(f"| {wname} | {r['checkpoint_every']} | {r['schedule']} | {label} | "
                     f"skipped | | | | | | | | {r['note']} |")
            continue
        t = r["time_s"]
        e = ratio_by.get((r["workload"], r["checkpoint_every"]), {})
        if r["contender"] in ("numpy", "torch", "jax") and e.get(f"speedup_vs_{r['contender']}"):
            lo, hi = e[f"speedup_vs_{r['contender']}_range"]
            value = e[f"speedup_vs_{r['contender']}"]
            faster = f"{value:.2f}× [{lo:.2f}–{hi:.2f}]"
        else:
            faster = ""
        eff = ""
        if r.get("blas_efficiency") is not None:
            lo, hi = r["blas_efficiency_range"]
            eff = f"{r['blas_efficiency']:.2f} [{lo:.2f}–{hi:.2f}]"
        mem_ratio = r.get("memory_ratio_vs_plain")
        notes = []
        if r.get("note"):
            notes.append(r["note"])
        if r.get("subnormals0") or r.get("subnormals_end"):
            notes.append(f"SUBNORMALS {r['subnormals0']}/{r['subnormals_end']}")
        if not r.get("finite", True):
            notes.append("NON-FINITE values")
        L.append(f"| {wname} | {r['checkpoint_every']} | {r['schedule']} | {label} | "
                 f"{_ms(t['median'])} [{_ms(t['min'])}–{_ms(t['max'])}] (n={t['n']}) | {faster} | "
                 f"{eff} | {r['gflops_per_s']:.1f} | {_mib(r['memory']['peak_bytes'])} | "
                 f"{'' if mem_ratio is None else f'{mem_ratio:.3f}'} | {r['recomputed_layers']} | "
                 f"{r['extra_flops'] / 1e9:.3f} | {'; '.join(notes)} |")
    L += _threads_section(result)
    L += ["", "## Targets (ratios on this machine; never asserted in tests)", "",
          "| workload | k | metric | target | value (medians) | met | value from min times | "
          "from |",
          "|---|---|---|---|---|---|---|---|"]
    for t in result["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")
        vmin = t.get("value_from_min_times")
        L.append(f"| {t['workload']} | {t['checkpoint_every']} | {t['metric']} | {t['op']} "
                 f"{t['target']} | {value} | {met} | {'' if vmin is None else f'{vmin:.3f}'} | "
                 f"{t.get('source', '')} |")
    L += ["", "## How to read it", ""]
    L += [f"- {n}" for n in result["notes"]]
    path.write_text("\n".join(L) + "\n")


def _mode_label(d: dict) -> str:
    """"split×2 (auto)": the mode chosen, its slices when split, (the mode asked for)."""
    if not d.get("mode"):
        return ""
    chosen = d["mode"] + (f"×{d['slices']}" if d["mode"] == "split" else "")
    return f"{chosen} ({d['threads_mode']})"


def _threads_section(result: dict) -> list:
    """Per workload and k: ckpt's threads mode, ckpt's and NumPy's step at 1 and at T threads,
    the fraction of the sgemm peak, and how many targets are met (empty for results written
    before these were measured)."""
    entries = [e for e in result["ratios"] if e.get("by_threads")]
    if not entries:
        return []
    meta = result["meta"]
    many = str(meta["threads"])
    counts = [many] if many == "1" else ["1", many]
    peaks = meta.get("gemm_peak_gflops_by_threads", {})
    peak_text = ", ".join(f"{peaks[c]:.0f} GFLOP/s on {c} thread{'s' if c != '1' else ''}"
                          for c in counts if peaks.get(c))
    used = {c: usable_peak(peaks, int(c)) for c in counts}
    title = " and ".join(counts) + (" threads" if many != "1" else " thread")
    L = ["", f"## Per workload: threads mode, {title}, fraction of the sgemm peak",
         "", f"Peak: ckpt's BLAS on one {meta['gemm_peak_n']}³ float32 GEMM, best of 5 or more: "
         f"{peak_text or 'not measured'}. Peak frac. = the step's GEMM FLOPs / median step "
         f"time / the best peak measured with up to as many threads ("
         + ", ".join(f"{used[c]:.0f} GFLOP/s for {c}" for c in counts if used[c])
         + "). Mode: what ckpt ran (split×slices or blas), with the mode asked for in "
         "brackets.", ""]
    header = ["workload (D×W, B)", "k"]
    for c in counts:
        header += [f"ckpt mode, {c} thr.", f"ckpt ms, {c} thr.", f"NumPy ms, {c} thr.",
                   f"ckpt × NumPy, {c} thr. [rounds]", f"peak frac. ckpt / NumPy, {c} thr."]
    if len(counts) == 2:
        header += ["ckpt speed-up 1 → " + many, "NumPy speed-up 1 → " + many]
    header.append("targets met")
    L += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shapes = {(r["workload"], r["checkpoint_every"]): r for r in result["rows"]}
    for e in entries:
        r = shapes[(e["workload"], e["checkpoint_every"])]
        cells = [f"{e['workload']} ({_shape(r)}, {r['batch']})", str(e["checkpoint_every"])]
        for c in counts:
            d = e["by_threads"].get(c)
            if d is None:
                cells += [""] * 5
                continue
            ratio = ""
            if d["speedup_vs_numpy"] is not None:
                lo, hi = d["speedup_vs_numpy_range"]
                ratio = f"{d['speedup_vs_numpy']:.2f}× [{lo:.2f}–{hi:.2f}]"
            fractions = " / ".join("–" if d[f"{who}_peak_fraction"] is None
                                   else f"{d[f'{who}_peak_fraction']:.2f}"
                                   for who in ("ckpt", "numpy"))
            cells += [_mode_label(d), _ms(d["ckpt_time_s"]),
                      "–" if d["numpy_time_s"] is None else _ms(d["numpy_time_s"]), ratio,
                      fractions]
        if len(counts) == 2:
            top = e["by_threads"].get(many, {})
            for who in ("ckpt", "numpy"):
                gain = top.get(f"{who}_speedup_vs_1_thread")
                cells.append("" if gain is None else f"{gain:.2f}×")
        verdicts = [t for t in result["targets"] if (t["workload"], t["checkpoint_every"])
                    == (e["workload"], e["checkpoint_every"]) and t["met"] is not None]
        missed = [t["metric"] for t in verdicts if not t["met"]]
        cells.append(f"{len(verdicts) - len(missed)}/{len(verdicts)}"
                     + (f" (missed: {', '.join(missed)})" if missed else ""))
        L.append("| " + " | ".join(cells) + " |")
    return L


def write_plot(path: Path, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7.5), squeeze=False)
    for col, name in enumerate(names):
        rows = [r for r in result["rows"] if r["workload"] == name]
        configs = list(dict.fromkeys((r["checkpoint_every"], r["schedule"]) for r in rows))
        contenders = list(dict.fromkeys(r["contender"] for r in rows))
        width = 0.8 / max(1, len(contenders))
        for j, c in enumerate(contenders):
            xs, times, lo, hi, mem = [], [], [], [], []
            for i, cfg in enumerate(configs):
                r = next((r for r in rows if (r["checkpoint_every"], r["schedule"]) == cfg
                          and r["contender"] == c and r["status"] == "ok"), None)
                if r is None:
                    continue
                xs.append(i + (j - (len(contenders) - 1) / 2) * width)
                t = r["time_s"]
                times.append(t["median"] * 1e3)
                lo.append((t["median"] - t["min"]) * 1e3)
                hi.append((t["max"] - t["median"]) * 1e3)
                mem.append(r["memory"]["peak_bytes"] / 2 ** 20)
            if not xs:
                continue
            label = CONTENDER_LABELS.get(c, c)
            axes[0][col].bar(xs, times, width, yerr=[lo, hi], capsize=2, label=label,
                             color=COLORS.get(c))
            axes[1][col].bar(xs, mem, width, label=label, color=COLORS.get(c))
        ticks = []
        for k, s in configs:
            ran = any(r["status"] == "ok" for r in rows
                      if (r["checkpoint_every"], r["schedule"]) == (k, s))
            ticks.append(f"k={k}" + (" plan" if s == "planned" else "") + ("" if ran else "\n(skipped)"))
        axes[0][col].set_yscale("log")
        w0 = rows[0]
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(range(len(configs)))
            ax.set_xticklabels(ticks)
        axes[0][col].set_title(f"{name}: {_shape(w0)}, B={w0['batch']}")
        axes[0][col].set_ylabel("step time (ms, log), median, min–max")
        axes[1][col].set_ylabel("peak activation memory (MiB)")
        # speed ratios as text
        text = []
        for e in result["ratios"]:
            if e["workload"] == name:
                parts = [f"k={e['checkpoint_every']}:"]
                for other, lab in (("numpy", "NumPy"), ("torch", "PyTorch"), ("jax", "JAX")):
                    v = e.get(f"speedup_vs_{other}")
                    if v is not None:
                        parts.append(f"{v:.2f}× vs {lab}")
                one = e.get("by_threads", {}).get("1")
                if result["meta"]["threads"] > 1 and one and one["speedup_vs_numpy"] is not None:
                    parts.append(f"({one['speedup_vs_numpy']:.2f}× on 1 thread)")
                second = []      # on its own line: the figures of ckpt's step alone
                if e.get("blas_efficiency") is not None:
                    second.append(f"BLAS eff {e['blas_efficiency']:.2f}")
                if e.get("mode"):
                    second.append("mode " + _mode_label(e))
                if e.get("peak_fraction") is not None:
                    second.append(f"{e['peak_fraction']:.2f} of peak")
                text.append(" ".join(parts) + ("\n    " + ", ".join(second) if second else ""))
        axes[0][col].set_xlabel("ckpt " + "\nckpt ".join(text), fontsize=7)
        axes[0][col].legend(fontsize=7, loc="best")
    fig.suptitle("ckpt vs NumPy vs PyTorch: one SGD step (forward + backward + update), float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, few steps (seconds): checks that the benchmark runs")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder")
    p.add_argument("--docs", action="store_true",
                   help=f"write into {DOCS_RESULTS.relative_to(ROOT)} (the docs' benchmark "
                        f"page) instead of --out")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="BLAS/OpenMP threads for every contender (default: all cores)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating rounds (default 11; quick 3)")
    p.add_argument("--workloads", default=None,
                   help="comma-separated subset, e.g. small,deep or resmlp")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite results.md and results.png from OUT/results.json, run nothing")
    args = p.parse_args(argv)
    args.rounds_given = args.rounds is not None
    if args.docs:
        args.out = str(DOCS_RESULTS)
    if args.quick:
        defaults = dict(rounds=3, warm_steps=2, warm_seconds=0.0, round_seconds=0.0,
                        min_steps=3, max_steps=3, gap=0.05)
    else:
        defaults = dict(rounds=11, warm_steps=3, warm_seconds=0.3, round_seconds=0.1,
                        min_steps=1, max_steps=200, gap=0.15)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        result = json.loads((out / "results.json").read_text())
        write_markdown(out / "results.md", result)
        write_plot(out / "results.png", result)
        return result
    started = time.perf_counter()
    load_before = os.getloadavg()
    chosen = wl.QUICK if args.quick else wl.FULL
    if args.workloads:
        wanted = {name.strip() for name in args.workloads.split(",") if name.strip()}
        unknown = wanted - {w.name for w in chosen}
        if unknown or not wanted:
            raise SystemExit(f"run.py: --workloads: unknown {sorted(unknown)}; choose from "
                             f"{[w.name for w in chosen]}")
        chosen = [w for w in chosen if w.name in wanted]
    unset = not args.quick
    env = worker_env(args.threads, unset)
    log = open(out / "workers.log", "w")
    notes_by_key = {}
    workers = {}
    names = ["ckpt", "numpy"]
    if args.no_torch:
        notes_by_key["torch"] = "PyTorch skipped (--no-torch)"
    elif importlib.util.find_spec("torch") is None:
        notes_by_key["torch"] = "PyTorch is not installed (pip install torch); skipped"
    else:
        names.append("torch")
    if importlib.util.find_spec("jax") is None:
        notes_by_key["jax"] = "JAX is not installed (pip install jax jaxlib); skipped"
    else:
        names.append("jax")
    infos = {}
    try:
        for name in names:
            worker = Worker(name, env, log)
            try:
                resp = worker.call(cmd="info")
            except WorkerError as exc:
                resp = {"ok": False, "error": str(exc)}
            if not resp["ok"]:
                notes_by_key[name] = f"{name} worker failed to start: {resp['error']}"
                worker.close()
                if name not in ("torch", "jax"):
                    raise WorkerError(notes_by_key[name])
                continue
            workers[name] = worker
            infos[name] = resp
        if any(w.name == "deep" for w in chosen):
            workers["ckpt-planned"] = Worker("ckpt", env, log)
        n_peak, peak_seconds = (256, 0.3) if args.quick else (2048, 1.0)
        peak = workers["ckpt"].call(cmd="gemm_peak", n=n_peak, seconds=peak_seconds)
        peaks = {args.threads: peak.get("gflops")}
        if args.threads > 1:
            # ckpt and NumPy again at one thread, timed in the same rounds
            for name in ("ckpt", "numpy"):
                workers[single_thread_key(name)] = Worker(name, worker_env(1, unset), log)
            peaks[1] = workers[single_thread_key("ckpt")].call(
                cmd="gemm_peak", n=n_peak, seconds=peak_seconds).get("gflops")
        rows = []
        for w in chosen:
            for k in w.intervals:
                entries = [("ckpt", "ckpt", "uniform"), ("numpy", "numpy", "uniform"),
                           ("torch", "torch", "uniform"), ("jax", "jax", "uniform")]
                if w.name == "deep" and k == w.sqrt_k and k > 1:
                    entries.append(("ckpt-planned", "ckpt", "planned"))
                print(f"[bench] {w.name} D={w.depth} W={w.width} B={w.batch} k={k} ...",
                      file=sys.stderr, flush=True)
                rows += run_config(w, k, entries, workers, args, notes_by_key)
    finally:
        for worker in workers.values():
            worker.close()
        log.close()
    ratios, targets = derive(rows, args.quick, peaks)
    blas = []
    for name, info in infos.items():
        pools = info["info"]["threadpool_info"]
        desc = ", ".join(f"{p.get('internal_api')} {p.get('version') or ''} "
                         f"{p.get('architecture') or p.get('threading_layer') or ''} "
                         f"×{p.get('num_threads')}" for p in pools)
        blas.append(f"{name}: {desc}")
    result = {
        "schema": 1,
        "meta": {
            "command": "python bench/run.py" + (" --quick" if args.quick else "")
                       + (f" --workloads {args.workloads}" if args.workloads else "")
                       + (f" --threads {args.threads}" if args.threads != (os.cpu_count() or 1)
                          else "")
                       + (f" --rounds {args.rounds}" if args.rounds_given else "")
                       + (" --docs" if args.docs
                          else "" if args.out == str(HERE / "results") else f" --out {args.out}"),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads,
            "quick": args.quick, "rounds": args.rounds, "round_seconds": args.round_seconds,
            "min_steps_per_round": args.min_steps, "gap_seconds": args.gap,
            "unset_blas_env": unset, "python": sys.version.split()[0],
            "learning_rate": wl.LEARNING_RATE, "seed": wl.SEED,
            "contenders": {k: v["info"] for k, v in infos.items()},
            "contender_env": {k: v["env"] for k, v in infos.items()},
            "blas_summary": "; ".join(blas),
            "gemm_peak_gflops": peak.get("gflops"), "gemm_peak_n": n_peak,
            "ckpt_simd": infos["ckpt"]["info"]["ckpt_simd"],
            "elapsed_seconds": None,
        },
        "workloads": [w.as_dict() for w in chosen],
        "row_types": {
            "uniform": "SegmentCheckpointer(checkpoint_every=k) (k=1: plain backprop); "
                       "NumPy the same schedule; PyTorch checkpoint_sequential(ceil(D/k) segments)",
            "planned": "ckpt.plan.plan(widths, batch, budget_bytes) at the peak of the uniform "
                       "floor(sqrt(D)) schedule, run as SegmentCheckpointer(layers, plan=p)",
        },
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
        "notes": [
            "k = checkpoint_every (segment length); k=1 is plain backprop for every contender.",
            "ckpt × faster = contender's median step time / ckpt's median step time at the same k; "
            "[range] = min–max of the per-round ratios (rounds are paired: same moment, "
            "alternating).",
            "BLAS eff. (ckpt rows) = time of the step's GEMMs alone through ckpt's own BLAS path "
            "(ckpt._core.dense_forward with identity for every forward and recomputed x@W; "
            "dense_backward with identity for x.T@d and d@W.T of every layer; same shapes, back "
            "to back, timed right after each step) / ckpt's step time. The identity kernels add "
            "one bias pass (forward) and one column-sum pass (backward), so this is an upper "
            "bound of the GEMM time.",
            "GFLOP/s = exact GEMM FLOPs of the step (2·B·in·out per GEMM, 3 per layer, one more "
            "per recomputed layer) / median step time. NumPy and PyTorch skip the input "
            "gradient of layer 0 (one GEMM fewer than counted); ckpt computes it.",
            "Peak memory: ckpt and NumPy: tracemalloc peak over a steady-state step (the step's "
            "activations, recomputed segment, gradient buffers and workspaces kept across steps; "
            "parameters, their gradients, input, target and the loss-gradient buffer excluded). "
            "PyTorch: bytes of tensors saved for backward at the end of forward "
            "(saved_tensors_hooks, unique storages, parameters excluded); it excludes the "
            "segment recomputed during backward and autograd's transient buffers, so it is a "
            "lower bound and not directly comparable to the tracemalloc figures.",
            "Recomputed elements / extra GFLOP: chain elements (a Dense layer; for resmlp also a "
            "whole residual block or a LayerNorm) forwarded again in backward, and the GEMM FLOPs "
            "of every Dense forward run again (2·B·in·out each). checkpoint_sequential "
            "recomputes whole segments (their last element too), so PyTorch recomputes more "
            "elements than ckpt at the same segment count.",
            "resmlp: N = D + 3 chain elements (input projection, D blocks, LayerNorm, output "
            "Dense), k = floor(sqrt(N)). At k=1 every contender keeps every block's internals "
            "(plain backprop). At k>1 every contender keeps the internals of the segment it "
            "recomputes; ckpt's blocks whose outputs are the checkpoints later segments start "
            "from keep only their output and rebuild their body in their backward (two more "
            "GEMMs each, counted in extra GFLOP). BLAS eff. counts every Dense GEMM ckpt "
            "runs; LayerNorm, ReLU and skip additions are the rest of the step.",
            "Subnormal floats: counted in the output, gradients and parameters after the first "
            "and the last step; any found is flagged in the notes column.",
            "Per workload (ckpt and NumPy, uniform schedules): each is timed again in a "
            "one-thread process (OPENBLAS_NUM_THREADS=1, ckpt.set_num_threads(1)) in the same "
            "alternating rounds, so the ratios at 1 thread and at the run's thread count are "
            "paired in time. ckpt mode = the threads mode its SegmentCheckpointer resolved to "
            "for the workload's batch at that thread count: split×S (the batch cut into S "
            "slices, one per thread, single-threaded BLAS) or blas (one slice, OpenBLAS threads "
            "each GEMM); in brackets the mode asked for (CKPT_THREADS_MODE or ckpt's default). "
            "Peak frac. = GFLOP/s of the step (as above) / GFLOP/s of one large float32 GEMM "
            "through ckpt's BLAS (the best of at least 5 runs and 1 s, measured once per run "
            "at 1 thread and at the run's count), the better of those measured with at most "
            "the step's thread count; NumPy's is against ckpt's OpenBLAS peak too.",
        ] + [v for v in notes_by_key.values()],
    }
    result["meta"]["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    result["meta"]["load_average_before_after"] = [list(load_before), list(os.getloadavg())]
    result["meta"]["gemm_peak_gflops_by_threads"] = {str(t): g for t, g in peaks.items()}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    write_markdown(out / "results.md", result)
    write_plot(out / "results.png", result)
    print(f"[bench] wrote {out / 'results.md'}, results.json, results.png in "
          f"{result['meta']['elapsed_seconds']} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
