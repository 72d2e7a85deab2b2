"""The pure-NumPy contender for the ``resmlp`` workload: the pre-norm residual MLP of
``ckpt.build_mlp(residual=True)``, MSE and SGD, with segment checkpointing.

The chain has N = D + 3 elements: the input projection Dense (linear), D blocks
y = x + Dense2(ReLU(Dense1(LayerNorm(x)))), a final LayerNorm and the output Dense (linear).
LayerNorm follows PyTorch (biased variance, eps inside the square root).

Written as a competent NumPy user would: ``x @ W + b`` with in-place bias, ReLU and skip
additions, the same segments as ``ckpt.SegmentCheckpointer(checkpoint_every=k)`` (keep the inputs
of elements 0, k, 2k, ... and the output). k = 1 is plain backprop: every element's internals
(a block's LayerNorm statistics, LayerNorm output and ReLU output) are kept from the forward. For
other k the forward keeps no internals; backward recomputes each segment once from its start
*keeping* its internals (as PyTorch's checkpointing does), then back-propagates through it. The
segment's last element is not run again (its output is held): only the part its backward needs
(a block's LayerNorm and first Dense; a LayerNorm's statistics). Like PyTorch, it does not
compute the gradient of the network input. Gradients are overwritten each step, not accumulated.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np


def _layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float,
               out: bool = True) -> Tuple[Optional[np.ndarray], tuple]:
    """(y or None, (mean, rstd)) for rows of x."""
    mean = x.mean(axis=1, keepdims=True)
    xc = x - mean
    var = np.einsum("ij,ij->i", xc, xc)[:, None]
    var /= x.shape[1]
    rstd = 1.0 / np.sqrt(var + eps)
    if not out:
        return None, (mean, rstd)
    xc *= rstd
    xc *= w
    xc += b
    return xc, (mean, rstd)


def _layernorm_backward(x: np.ndarray, stats: tuple, w: np.ndarray, g: np.ndarray,
                        gw: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """Input gradient of LayerNorm; writes (not accumulates) gw and gb."""
    mean, rstd = stats
    xhat = x - mean
    xhat *= rstd
    np.sum(g, axis=0, out=gb)
    np.einsum("ij,ij->j", g, xhat, out=gw)
    gx = g * w                      # gradient of xhat
    n = x.shape[1]
    c1 = gx.sum(axis=1, keepdims=True) / n
    c2 = np.einsum("ij,ij->i", gx, xhat)[:, None] / n
    xhat *= c2
    gx -= c1
    gx -= xhat
    gx *= rstd
    return gx


class NumpyResMLP:
    """Pre-norm residual MLP; ``params`` flat as bench.workloads.initial_resmlp_params gives."""

    def __init__(self, params: Sequence[np.ndarray], depth: int, checkpoint_every: int,
                 eps: float = 1e-5, dtype=np.float32) -> None:
        if len(params) != 6 * depth + 6:
            raise ValueError(f"{depth} blocks need {6 * depth + 6} parameter arrays, "
                             f"got {len(params)}")
        self.P: List[np.ndarray] = [np.array(p, dtype) for p in params]
        self.G: List[np.ndarray] = [np.zeros_like(p) for p in self.P]
        self.depth = depth
        self.n = depth + 3
        self.eps = eps
        k = checkpoint_every
        self.k = self.n if k <= 0 or k > self.n else k
        self._kept: dict = {}
        self._caches: dict = {}
        self.recomputed_layers = 0   # whole elements run again (counted for the schedule check)
        self.recomputed_gemms = 0    # W x W forward GEMMs run again

    # Element i's parameters start at self.P[_first(i)].
    def _first(self, i: int) -> int:
        if i == 0:
            return 0
        return 2 + 6 * (i - 1) if i <= self.depth + 1 else 4 + 6 * self.depth

    def _element(self, i: int, x: np.ndarray, need_output: bool = True):
        """(output or None, cache for backward) of element i."""
        P, j = self.P, self._first(i)
        if i == 0 or i == self.n - 1:                       # Dense, linear
            if not need_output:
                return None, None
            y = x @ P[j]
            y += P[j + 1]
            return y, None
        if i == self.n - 2:                                 # final LayerNorm
            return _layernorm(x, P[j], P[j + 1], self.eps, need_output)
        u, stats = _layernorm(x, P[j], P[j + 1], self.eps)  # block
        h = u @ P[j + 2]
        h += P[j + 3]
        np.maximum(h, 0, out=h)
        if not need_output:
            return None, (stats, u, h)
        y = h @ P[j + 4]
        y += P[j + 5]
        y += x
        return y, (stats, u, h)

    def _element_backward(self, i: int, x: np.ndarray, cache, g: np.ndarray,
                          input_grad: bool) -> Optional[np.ndarray]:
        """Writes element i's parameter gradients; returns its input gradient (if wanted).
        g may be overwritten."""
        P, G, j = self.P, self.G, self._first(i)
        if i == 0 or i == self.n - 1:
            np.matmul(x.T, g, out=G[j])
            np.sum(g, axis=0, out=G[j + 1])
            return g @ P[j].T if input_grad else None
        if i == self.n - 2:
            return _layernorm_backward(x, cache, P[j], g, G[j], G[j + 1])
        stats, u, h = cache
        np.matmul(h.T, g, out=G[j + 4])
        np.sum(g, axis=0, out=G[j + 5])
        gh = g @ P[j + 4].T
        gh *= h > 0
        np.matmul(u.T, gh, out=G[j + 2])
        np.sum(gh, axis=0, out=G[j + 3])
        gu = gh @ P[j + 2].T
        gx = _layernorm_backward(x, stats, P[j], gu, G[j], G[j + 1])
        gx += g                                             # the skip path
        return gx

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run the network; keep the segment starts and the output (k = 1: everything)."""
        k, last = self.k, self.n - 1
        kept, caches = {0: x}, {}
        h = x
        for i in range(self.n):
            h, cache = self._element(i, h)
            if k == 1:
                caches[i] = cache
            if (i + 1) % k == 0 or i == last:
                kept[i + 1] = h
        self._kept, self._caches = kept, caches
        return h

    def backward(self, grad_output: np.ndarray) -> None:
        """Gradients of every parameter from dL/dy (grad_output may be overwritten)."""
        kept, caches, k = self._kept, self._caches, self.k
        g = grad_output
        for start in reversed(range(0, self.n, k)):
            end = min(start + k, self.n)
            acts = [kept[start]]
            if k == 1:
                seg_caches = [caches.pop(start)]
            else:
                seg_caches = []
                for i in range(start, end - 1):             # recompute, keeping internals
                    y, cache = self._element(i, acts[-1])
                    acts.append(y)
                    seg_caches.append(cache)
                    self.recomputed_layers += 1
                    self.recomputed_gemms += self._gemms(i)
                _, cache = self._element(end - 1, acts[-1], need_output=False)
                seg_caches.append(cache)
                if 1 <= end - 1 <= self.depth:
                    self.recomputed_gemms += 1              # a block's first Dense
            kept.pop(end)                                   # the segment's output is dead now
            for i in reversed(range(start, end)):
                x = acts[i - start]
                g = self._element_backward(i, x, seg_caches[i - start], g, input_grad=i > 0)
                acts[i - start] = seg_caches[i - start] = None
        self._kept, self._caches = {}, {}

    def _gemms(self, i: int) -> int:
        return 0 if i == self.n - 2 else (1 if i in (0, self.n - 1) else 2)

    def update(self, lr: float) -> None:
        """SGD in place: p -= lr * grad (the gradients are overwritten next step, not zeroed)."""
        for p, g in zip(self.P, self.G):
            g *= lr
            p -= g

    def params(self) -> list:
        return list(self.P)

    def gradients(self) -> list:
        return list(self.G)
