"""The JAX contender of the benchmark (bench/worker.py ``jax``; its own process).

One SGD step of the Dense ReLU MLP workloads under ``jax.jit``, parameters donated, with
``jax.checkpoint`` around each segment of k layers -- the segments of ckpt and NumPy: starts at
0, k, 2k, ...; k = 1 is plain autodiff (nothing wrapped), k = 0 one segment of all layers. The
weights, batch, loss (mean squared error) and learning rate are the other contenders'
(bench/workloads.py). ``jax.checkpoint`` recomputes a whole segment in backward, its last layer
too, where ckpt and NumPy keep the last layer's output; XLA may also drop or merge work. So the
recomputation is not counted from the schedule but read from the compiled program: the number
of ``dot`` operations in the optimised HLO, less the 3 D - 1 of plain backprop (the first layer's
input gradient is never computed), is the recomputed GEMM count the row reports
(``recomputed_gemms``; ``hlo_dots`` beside it). The memory the row reports is XLA's own account
of the compiled step's temporaries (``compiled.memory_analysis().temp_size_in_bytes``), which
tracemalloc cannot see; the worker adds the process's resident peak (VmHWM) for every contender.

XLA's CPU backend sizes its thread pool from the cores; at one thread the worker passes
``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` in ``XLA_FLAGS`` before
JAX is imported.
"""
from __future__ import annotations

import os
import re

import numpy as np

import workloads as wl


class JaxContender:
    """The worker's contender interface (see bench/worker.py's Contender) for JAX."""

    name = "jax"

    def __init__(self, threads: int) -> None:
        self.threads = threads
        if threads == 1:
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1").strip()

    def info(self) -> dict:
        import jax
        import jaxlib
        from threadpoolctl import threadpool_info
        return {"numpy": np.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                "devices": [str(d) for d in jax.devices()],
                "xla_flags": os.environ.get("XLA_FLAGS"), "threadpool_info": threadpool_info()}

    def prepare(self, w, k: int, variant: str) -> dict:
        if w.kind != "mlp":
            raise ValueError("the JAX contender runs the Dense MLP workloads only")
        if variant != "uniform":
            raise ValueError("the JAX contender runs uniform segments only")
        import jax
        import jax.numpy as jnp
        self.jax = jax
        weights, biases = wl.initial_weights(w)
        depth = len(weights)
        kk = depth if k <= 0 or k > depth else k
        segments = [(s, min(s + kk, depth)) for s in range(0, depth, kk)]
        lr = np.float32(wl.LEARNING_RATE)

        def layers(params, h, start, end):
            for i in range(start, end):
                W, b = params[i]
                h = h @ W + b
                if i != depth - 1:
                    h = jax.nn.relu(h)
            return h

        def forward(params, x):
            h = x
            for start, end in segments:
                if kk == 1:
                    h = layers(params, h, start, end)
                else:
                    segment = jax.checkpoint(
                        lambda p, h, start=start, end=end: layers(p, h, start, end))
                    h = segment(params, h)
            return h

        def loss(params, x, t):
            y = forward(params, x)
            return jnp.mean((y - t) ** 2), y

        grad = jax.value_and_grad(loss, has_aux=True)

        def step(params, x, t):
            _, grads = grad(params, x, t)
            return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)

        self.params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in zip(weights, biases)]
        self.jx, self.jt = jnp.asarray(self.x), jnp.asarray(self.t)
        self._step = jax.jit(step, donate_argnums=0)
        self._grad = jax.jit(grad)
        compiled = self._step.lower(self.params, self.jx, self.jt).compile()
        dots = len(re.findall(r"= [^=]*\bdot\(", compiled.as_text()))
        recomputed = dots - (3 * depth - 1)
        try:
            temp = int(compiled.memory_analysis().temp_size_in_bytes)
        except (AttributeError, TypeError):      # a jaxlib without the analysis on CPU
            temp = None
        self._temp_bytes = temp
        note = ("plain autodiff (no checkpointing)" if kk == 1 else
                f"jax.checkpoint on {len(segments)} segments of {kk} layers")
        note += f"; the optimised HLO has {dots} dots ({recomputed} recomputed GEMMs)"
        return {"recomputed_layers": recomputed, "recomputed_gemms": recomputed,
                "hlo_dots": dots, "segments": len(segments), "note": note}

    def step(self) -> None:
        self.params = self._step(self.params, self.jx, self.jt)
        self.jax.block_until_ready(self.params)

    def loss_and_grads(self):
        (loss, y), grads = self._grad(self.params, self.jx, self.jt)
        arrays = [np.asarray(y)] + [np.asarray(a) for pair in grads for a in pair]
        arrays += [np.asarray(a) for pair in self.params for a in pair]
        return float(loss), arrays

    def memory(self) -> dict:
        self.step()
        return {"peak_bytes": self._temp_bytes,
                "method": "XLA's memory analysis of the compiled step: temporaries "
                          "(temp_size_in_bytes; parameters, input and target excluded)"}

    def gemm_only(self) -> None:
        return None
