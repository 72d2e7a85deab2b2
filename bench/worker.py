"""One contender of the benchmark, in its own process (started by bench/run.py; not run by hand).

    python bench/worker.py CONTENDER        # ckpt | numpy | torch | jax (bench/jax_mlp.py)

Reads one JSON command per line on stdin and answers one JSON line on stdout:

- ``{"cmd": "setup", "workload": {...}, "k": K, "variant": "uniform"|"planned", ...}``: build the
  network from the shared initial weights, measure memory over one step, warm up, calibrate;
- ``{"cmd": "run", "steps": N, "gemm": true}``: time N steps (ckpt also times its GEMM-only
  sequence after each step, interleaved, for the BLAS efficiency, unless "gemm" is false);
- ``{"cmd": "check"}``: one more forward + backward; counts subnormal values, reports the loss;
- ``{"cmd": "info"}``: library versions and threadpoolctl.threadpool_info() of this process;
- ``{"cmd": "quit"}``.

Only one contender's libraries are imported per process, so only its BLAS pool exists here
(the ckpt process also loads NumPy's bundled OpenBLAS, which stays idle: the step's NumPy work
is elementwise).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import tracemalloc
import traceback
from abc import ABC, abstractmethod

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import workloads as wl  # noqa: E402


def _median(xs):
    return float(np.median(np.asarray(xs, dtype=np.float64)))


# ------------------------------------------------------------------------------------ contenders
class Contender(ABC):
    name = "?"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def info(self) -> dict:
        from threadpoolctl import threadpool_info
        return {"numpy": np.__version__, "threadpool_info": threadpool_info()}

    # set by setup()
    workload: wl.Workload
    x: np.ndarray
    t: np.ndarray

    @abstractmethod
    def prepare(self, w: wl.Workload, k: int, variant: str) -> dict:
        """Build the network for workload w at checkpoint_every k; returns notes for the row."""

    @abstractmethod
    def step(self) -> None:
        """One training step: forward, loss gradient, backward, SGD update."""

    @abstractmethod
    def loss_and_grads(self):
        """One forward + backward without update: (loss, [arrays to check for subnormals])."""

    def memory(self) -> dict:
        """Peak bytes over one step, buffers kept across steps counted (after the first step)."""
        tracemalloc.start()
        try:
            self.step()                      # allocates any workspace kept across steps
            tracemalloc.reset_peak()
            self.step()
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return {"peak_bytes": int(peak), "method": "tracemalloc (peak over a steady-state step; "
                "buffers kept across steps counted; parameters, input, target and the loss-gradient "
                "buffer excluded)"}

    def gemm_only(self) -> None:
        return None


class CkptContender(Contender):
    name = "ckpt"

    def info(self) -> dict:
        import ckpt
        d = super().info()
        d.update({"ckpt": ckpt.__version__, "ckpt_file": ckpt.__file__,
                  "ckpt_blas_threads": ckpt.get_num_threads(),
                  "ckpt_simd": ckpt.simd_variant()})
        return d

    def prepare(self, w, k, variant):
        import ckpt
        from ckpt import _core
        from ckpt.schedule import compile_schedule, uniform_ops
        ckpt.set_num_threads(self.threads)
        layers = self._build(w)
        note = None
        extra = {}
        if variant == "planned":
            import ckpt.plan as ckpt_plan
            costs = ckpt.SegmentCheckpointer(layers).costs
            uniform = compile_schedule(uniform_ops(w.n_elements, k), costs)
            budget = uniform.peak_units * w.batch * np.dtype(np.float32).itemsize
            p = ckpt_plan.plan(costs if w.kind != "mlp" else list(w.widths), w.batch, budget)
            self.model = ckpt.SegmentCheckpointer(layers, plan=p)
            extra["budget_bytes"] = int(budget)
            note = f"ckpt.plan at the budget of {k}-element uniform segments ({budget} bytes)"
        else:
            self.model = ckpt.SegmentCheckpointer(layers, checkpoint_every=k)
        self.layers = layers
        self.g = np.empty((w.batch, w.widths[-1]), np.float32)
        self.scale = np.float32(2.0 / self.g.size)
        self.lr = wl.LEARNING_RATE
        compiled = self.model.schedule(w.batch)
        self.recomputed = list(compiled.recomputed_layers)
        extra["schedule_peak_bytes"] = int(compiled.peak_units * w.batch * 4)
        extra["executor"] = self.model.executor
        extra.update(self._threads_mode(w.batch))
        if variant == "uniform":
            if sorted(self.recomputed) != wl.uniform_recomputed_layers(w.n_elements, k):
                raise AssertionError("ckpt's schedule recomputes other elements than the "
                                     "uniform count")
            if k == 1 and w.kind == "resmlp" and compiled.rebuilt_layers:
                raise AssertionError("plain backprop must keep the blocks' internals")
        self._setup_gemm_only(w, _core, rebuilt=compiled.rebuilt_layers)
        extra["recomputed_gemms"] = len(self._gemm_fw) - sum(w.dense_per_element)
        if variant == "uniform" and extra["recomputed_gemms"] != wl.recomputed_gemms(w, "ckpt", k):
            raise AssertionError("ckpt recomputes another number of GEMMs than counted")
        return {"recomputed_layers": len(self.recomputed), "note": note, **extra}

    def _threads_mode(self, batch: int) -> dict:
        """How the step uses the threads: the mode asked for (the checkpointer's, else the
        context's: CKPT_THREADS_MODE or ckpt's default) and the one it resolved to at this
        batch and thread count ("split" into ``slices`` batch slices, or "blas": one slice,
        OpenBLAS threads each GEMM)."""
        import ckpt
        slices = self.model.slices(batch)
        return {"threads_mode": self.model.threads_mode or ckpt.get_threading_mode(),
                "mode": "split" if slices > 1 else "blas", "slices": slices,
                "threads_tuning": self.model.threads_tuning.report()}

    @staticmethod
    def _build(w):
        """The workload's layers, with the shared initial parameters."""
        if w.kind == "resmlp":
            from ckpt.train import build_mlp
            layers = build_mlp(w.width, w.depth, w.width, w.width, "relu", np.float32, 0,
                               residual=True)
            params = [p for layer in layers for p in layer.params()]
            values = wl.initial_resmlp_params(w)
            if [p.shape for p in params] != [v.shape for v in values]:
                raise AssertionError("build_mlp(residual=True) has other parameters than the "
                                     "workload's")
            for p, v in zip(params, values):
                p[...] = v
            return layers
        return wl.ckpt_dense_layers(w)

    def _setup_gemm_only(self, w, _core, rebuilt) -> None:
        """Buffers for ckpt's GEMMs alone: the same shapes through ckpt's own BLAS path.

        Forward GEMMs: every Dense once, the Dense layers of every recomputed element again,
        and the body of every block whose internals were not kept (``rebuilt``) once more,
        rebuilt in its backward. Backward: every Dense once."""
        from ckpt.layers import Dense, walk
        rng = np.random.default_rng(0)
        widest = max(w.widths)
        self._core = _core

        def dense_in(layer):
            return [d for d in walk([layer]) if isinstance(d, Dense)]

        forward = [d for layer in self.layers for d in dense_in(layer)]
        for i in self.recomputed:
            forward += dense_in(self.layers[i])
        for i in rebuilt:
            forward += dense_in(self.layers[i])
        backward = [d for layer in reversed(self.layers) for d in reversed(dense_in(layer))]
        self._ga = rng.standard_normal((w.batch, widest)).astype(np.float32)
        self._gb = rng.standard_normal((w.batch, widest)).astype(np.float32)
        self._gw = {id(d): np.zeros_like(d.W) for d in backward}
        self._gbias = {id(d): np.zeros_like(d.b) for d in backward}
        self._zero_b = {id(d): np.zeros_like(d.b) for d in backward}
        self._gemm_fw = [(self._ga[:, :d.in_features], d.W, self._zero_b[id(d)],
                          self._gb[:, :d.out_features]) for d in forward]
        self._gemm_bw = [(self._ga[:, :d.in_features], d.W, self._gb[:, :d.out_features],
                          self._gw[id(d)], self._gbias[id(d)], self._ga[:, :d.in_features])
                         for d in backward]
        # Slices of (B, widest) buffers are C-contiguous only when the width is the widest one;
        # every workload here has one width, so they are; check it.
        for args in self._gemm_fw + self._gemm_bw:
            for a in args:
                assert a.flags.c_contiguous

    def gemm_only(self) -> None:
        """The step's GEMMs back to back: x@W for every forward and recomputation (identity, so
        plus one bias pass), then per Dense x.T@d and d@W.T (identity backward, plus one
        colsum)."""
        fwd, bwd = self._core.dense_forward, self._core.dense_backward
        for x, W, b, y in self._gemm_fw:
            fwd(x, W, b, y, 0)
        for x, W, g, gw, gb, gx in self._gemm_bw:
            bwd(x, W, g, None, None, gw, gb, gx, 0)

    def step(self) -> None:
        model = self.model
        y = model.forward(self.x)
        g = self.g
        np.subtract(y, self.t, out=g)
        g *= self.scale
        # The backward sets the gradients (no zero_grad pass), as NumPy's step overwrites its.
        model.backward(g, input_grad=False, accumulate=False)
        model.update(self.lr)

    def loss_and_grads(self):
        y = self.model.forward(self.x)
        np.subtract(y, self.t, out=self.g)
        loss = float(np.mean(self.g.astype(np.float64) ** 2))
        y_copy = y.copy()
        self.g *= self.scale
        gx = self.model.backward(self.g)
        arrays = [y_copy, gx] + self.model.gradients() + self.model.params()
        out = (loss, arrays)
        self.model.zero_grad()
        return out

    def memory(self):
        d = super().memory()
        tr = self.model.memory_tracker
        d["tracker_peak_bytes"] = int(tr.peak_bytes)
        return d


class NumpyContender(Contender):
    name = "numpy"

    def prepare(self, w, k, variant):
        from threadpoolctl import threadpool_limits
        self._limits = threadpool_limits(self.threads)
        if w.kind == "resmlp":
            from numpy_resmlp import NumpyResMLP
            self.model = NumpyResMLP(wl.initial_resmlp_params(w), w.depth, k,
                                     eps=wl.LAYERNORM_EPS)
        else:
            from numpy_mlp import NumpyMLP
            weights, biases = wl.initial_weights(w)
            self.model = NumpyMLP(weights, biases, k)
        self.g = np.empty((w.batch, w.widths[-1]), np.float32)
        self.scale = np.float32(2.0 / self.g.size)
        self.lr = wl.LEARNING_RATE
        self.model.recomputed_layers = 0
        x0 = self.model.forward(self.x)
        np.subtract(x0, self.t, out=self.g)
        self.model.backward(self.g)
        recomputed = self.model.recomputed_layers
        gemms = getattr(self.model, "recomputed_gemms", recomputed)
        grads = (self.model.gradients() if hasattr(self.model, "gradients")
                 else self.model.gW + self.model.gb)
        for a in grads:
            a.fill(0)
        if recomputed != len(wl.uniform_recomputed_layers(w.n_elements, k)):
            raise AssertionError("the NumPy contender recomputes another number of elements")
        if gemms != wl.recomputed_gemms(w, "numpy", k):
            raise AssertionError("the NumPy contender recomputes another number of GEMMs")
        note = None
        if w.kind == "resmlp" and k != 1:
            note = ("recomputes each segment once keeping the blocks' internals (no rebuild "
                    "inside a block's backward)")
        return {"recomputed_layers": recomputed, "recomputed_gemms": gemms, "note": note}

    def step(self) -> None:
        model = self.model
        y = model.forward(self.x)
        g = self.g
        np.subtract(y, self.t, out=g)
        g *= self.scale
        model.backward(g)
        model.update(self.lr)

    def loss_and_grads(self):
        y = self.model.forward(self.x)
        np.subtract(y, self.t, out=self.g)
        loss = float(np.mean(self.g.astype(np.float64) ** 2))
        y_copy = y.copy()
        self.g *= self.scale
        self.model.backward(self.g)
        grads = (self.model.gradients() if hasattr(self.model, "gradients")
                 else self.model.gW + self.model.gb)
        return loss, [y_copy] + grads + self.model.params()


class TorchContender(Contender):
    name = "torch"

    def info(self) -> dict:
        import torch
        d = super().info()
        d.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                  "torch_parallel_info": torch.__config__.parallel_info()})
        return d

    def prepare(self, w, k, variant):
        import torch
        self.torch = torch
        torch.set_num_threads(self.threads)
        self.model = self._build(w)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=wl.LEARNING_RATE)
        n = w.n_elements
        self.segments = None if k == 1 else -(-n // k)
        self.tx = torch.from_numpy(self.x)
        self.tt = torch.from_numpy(self.t)
        recomputed = wl.torch_recomputed_layers(n, k)
        note = ("plain autograd (no checkpointing)" if k == 1 else
                f"checkpoint_sequential({self.segments} segments, use_reentrant=False); it "
                f"recomputes whole segments, {len(recomputed)} element forwards")
        return {"recomputed_layers": len(recomputed), "segments": self.segments,
                "recomputed_gemms": wl.recomputed_gemms(w, "torch", k), "note": note}

    def _build(self, w):
        """nn.Sequential of the workload's elements, with the shared initial parameters."""
        torch = self.torch
        from torch import nn

        def linear(W, b):
            lin = nn.Linear(W.shape[0], W.shape[1])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
                lin.bias.copy_(torch.from_numpy(b))
            return lin

        def norm(weight, bias):
            ln = nn.LayerNorm(weight.shape[0], eps=wl.LAYERNORM_EPS)
            with torch.no_grad():
                ln.weight.copy_(torch.from_numpy(weight))
                ln.bias.copy_(torch.from_numpy(bias))
            return ln

        if w.kind == "resmlp":
            class Block(nn.Module):
                """x + fc2(relu(fc1(norm(x))))."""

                def __init__(self, ln_w, ln_b, W1, b1, W2, b2):
                    super().__init__()
                    self.norm = norm(ln_w, ln_b)
                    self.fc1 = linear(W1, b1)
                    self.act = nn.ReLU()
                    self.fc2 = linear(W2, b2)

                def forward(self, x):
                    return x + self.fc2(self.act(self.fc1(self.norm(x))))

            parts = wl.split_resmlp_params(w, wl.initial_resmlp_params(w))
            return nn.Sequential(linear(*parts["proj"]),
                                 *[Block(*blk) for blk in parts["blocks"]],
                                 norm(*parts["norm"]), linear(*parts["head"]))
        weights, biases = wl.initial_weights(w)
        blocks = []
        for i in range(w.depth):
            lin = linear(weights[i], biases[i])
            blocks.append(nn.Sequential(lin, nn.ReLU()) if i < w.depth - 1 else lin)
        return nn.Sequential(*blocks)

    def _forward(self):
        if self.segments is None:
            return self.model(self.tx)
        from torch.utils.checkpoint import checkpoint_sequential
        return checkpoint_sequential(self.model, self.segments, self.tx, use_reentrant=False)

    def step(self) -> None:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        y = self._forward()
        loss = torch.nn.functional.mse_loss(y, self.tt)
        loss.backward()
        self.opt.step()

    def loss_and_grads(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        y = self._forward()
        loss = torch.nn.functional.mse_loss(y, self.tt)
        loss.backward()
        arrays = [y.detach().numpy().copy()]
        for p in self.model.parameters():
            arrays.append(p.detach().numpy())
            arrays.append(p.grad.numpy())
        return loss.item(), arrays

    def memory(self):
        """Bytes of tensors autograd saves for backward (unique storages, parameters excluded),
        at the end of the forward pass, where they peak. The segment that non-reentrant
        checkpointing recomputes in backward is saved through its own hooks, not seen here."""
        torch = self.torch
        param_ptrs = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in param_ptrs and ptr not in seen:
                seen[ptr] = s.nbytes()
            return t

        def unpack(t):
            return t

        self.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            y = self._forward()
            loss = torch.nn.functional.mse_loss(y, self.tt)
        saved = sum(seen.values())
        loss.backward()
        self.opt.step()
        return {"peak_bytes": int(saved),
                "method": "saved-tensor bytes after forward (torch.autograd.graph."
                          "saved_tensors_hooks; unique storages, parameters excluded; "
                          "the segment recomputed during backward is not included)"}


def _jax_contender(threads: int):
    from jax_mlp import JaxContender
    return JaxContender(threads)


CONTENDERS = {"ckpt": CkptContender, "numpy": NumpyContender, "torch": TorchContender,
              "jax": _jax_contender}


def resident_peak_bytes(step) -> int:
    """The process's peak resident memory over one step: VmHWM from /proc/self/status after
    writing 5 to /proc/self/clear_refs (which resets it to the current resident size)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


# ------------------------------------------------------------------------------------ protocol
def main() -> None:
    name = sys.argv[1]
    threads = int(os.environ.get("CKPT_BENCH_THREADS", os.cpu_count() or 1))
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)          # anything printed by a library goes to stderr, not the protocol
    sys.stdout = sys.stderr
    c = CONTENDERS[name](threads)

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "quit":
                reply({"ok": True})
                break
            if cmd == "info":
                reply({"ok": True, "info": c.info(), "env": {
                    k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                   "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                   "MKL_NUM_THREADS")}})
            elif cmd == "setup":
                w = wl.Workload(**msg["workload"])
                c.workload = w
                c.x, c.t = wl.batch_data(w)
                prep = c.prepare(w, msg["k"], msg.get("variant", "uniform"))
                loss0, arrays = c.loss_and_grads()       # from the initial weights
                sub0 = sum(wl.count_subnormals(a) for a in arrays)
                mem = c.memory()
                mem["resident_peak_bytes"] = resident_peak_bytes(c.step)
                if mem["peak_bytes"] is None:
                    mem["peak_bytes"] = mem["resident_peak_bytes"]
                # Warm-up: at least `warm_steps` steps and `warm_seconds`; calibrate a round.
                times = []
                t_end = time.perf_counter() + msg["warm_seconds"]
                while len(times) < msg["warm_steps"] or time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    c.step()
                    times.append(time.perf_counter() - t0)
                    if len(times) > 2000:
                        break
                c.gemm_only()
                if hasattr(c, "_threads_mode"):      # after the warm-up: the tuned choice
                    prep.update(c._threads_mode(w.batch))
                per = _median(times[len(times) // 2:])
                n = int(min(msg["max_steps"], max(msg["min_steps"],
                                                   math.ceil(msg["round_seconds"] / max(per, 1e-6)))))
                reply({"ok": True, "prepare": prep, "loss0": loss0, "subnormals0": sub0, "memory": mem,
                       "warmup_steps": len(times), "steps_per_round": n})
            elif cmd == "run":
                steps, gemms = [], []
                for _ in range(msg["steps"]):
                    t0 = time.perf_counter()
                    c.step()
                    t1 = time.perf_counter()
                    steps.append(t1 - t0)
                    if name == "ckpt" and msg.get("gemm", True):
                        c.gemm_only()
                        gemms.append(time.perf_counter() - t1)
                reply({"ok": True, "steps": steps, "gemm": gemms})
            elif cmd == "check":
                loss, arrays = c.loss_and_grads()
                sub = sum(wl.count_subnormals(a) for a in arrays)
                finite = all(bool(np.isfinite(a).all()) for a in arrays)
                reply({"ok": True, "loss": loss, "subnormals": sub, "finite": finite,
                       "values_checked": int(sum(np.asarray(a).size for a in arrays))})
            elif cmd == "gemm_peak":
                reply({"ok": True, "gflops": gemm_peak(msg.get("n", 2048), c.threads,
                                                        seconds=msg.get("seconds", 0.0))})
            else:
                reply({"ok": False, "error": f"unknown command {cmd}"})
        except Exception as exc:  # report, keep serving
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()})


def gemm_peak(n: int, threads: int, repeats: int = 5, seconds: float = 0.0) -> float:
    """GFLOP/s of one n x n x n float32 GEMM through ckpt's BLAS path on ``threads`` threads,
    the best of at least ``repeats`` runs and ``seconds`` of runs after a warm-up (more runs
    find an undisturbed one on a busy machine): the practical peak a step's FLOP/s is compared
    with."""
    import ckpt
    from ckpt import _core
    ckpt.set_num_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    y = np.empty((n, n), np.float32)
    z = np.zeros(n, np.float32)
    _core.dense_forward(a, b, z, y, 0)
    best = float("inf")
    runs = 0
    end = time.perf_counter() + seconds
    while runs < repeats or time.perf_counter() < end:
        t0 = time.perf_counter()
        _core.dense_forward(a, b, z, y, 0)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return 2.0 * n ** 3 / best / 1e9

if __name__ == "__main__":
    main()
