"""The pure-NumPy contender: the same ReLU MLP, MSE and SGD step, with segment checkpointing.

Written as a competent NumPy user would: ``x @ W + b`` with in-place bias and ReLU, gradients
written into preallocated arrays with ``out=``, in-place SGD updates, and the same schedule as
``ckpt.SegmentCheckpointer(checkpoint_every=k)``: keep the inputs of layers 0, k, 2k, ... (and the
output); in backward, recompute each segment once from its start, then back-propagate through it.
Like PyTorch (and unlike ckpt, which always returns it), it does not compute the gradient of the
network input.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np


class NumpyMLP:
    def __init__(self, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray],
                 checkpoint_every: int) -> None:
        self.W: List[np.ndarray] = [np.array(w, np.float32) for w in weights]
        self.b: List[np.ndarray] = [np.array(b, np.float32) for b in biases]
        self.gW = [np.zeros_like(w) for w in self.W]
        self.gb = [np.zeros_like(b) for b in self.b]
        self.depth = len(self.W)
        k = checkpoint_every
        self.k = self.depth if k <= 0 or k > self.depth else k
        self._kept: dict = {}
        self.recomputed_layers = 0   # counted, so the test can check the schedule

    def _layer(self, i: int, x: np.ndarray) -> np.ndarray:
        y = x @ self.W[i]
        y += self.b[i]
        if i != self.depth - 1:
            np.maximum(y, 0, out=y)
        return y

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run the network; keep the segment starts and the output for backward."""
        k, last = self.k, self.depth - 1
        kept = {0: x}
        h = x
        for i in range(self.depth):
            h = self._layer(i, h)
            if (i + 1) % k == 0 or i == last:
                kept[i + 1] = h
        self._kept = kept
        return h

    def backward(self, grad_output: np.ndarray) -> None:
        """Gradients of every W and b from dL/dy (grad_output may be overwritten)."""
        kept, k, last = self._kept, self.k, self.depth - 1
        g = grad_output
        for start in reversed(range(0, self.depth, k)):
            end = min(start + k, self.depth)
            acts = [kept[start]]
            for i in range(start, end - 1):        # recompute the inside of the segment
                acts.append(self._layer(i, acts[-1]))
                self.recomputed_layers += 1
            acts.append(kept.pop(end))              # the segment's output; its start is the
                                                    # previous segment's end, popped there
            for i in reversed(range(start, end)):
                x, y = acts[i - start], acts[i - start + 1]
                if i != last:
                    g *= y > 0                      # ReLU' from the output
                acts[i - start + 1] = None          # y is dead now
                np.matmul(x.T, g, out=self.gW[i])
                np.sum(g, axis=0, out=self.gb[i])
                if i:
                    g = g @ self.W[i].T
        self._kept = {}

    def update(self, lr: float) -> None:
        """SGD in place: p -= lr * grad (the gradients are overwritten next step, not zeroed)."""
        for W, gW, b, gb in zip(self.W, self.gW, self.b, self.gb):
            gW *= lr
            W -= gW
            gb *= lr
            b -= gb

    def params(self) -> list:
        return [p for pair in zip(self.W, self.b) for p in pair]
