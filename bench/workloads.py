"""Workloads of the benchmark: shapes, the shared initial weights, and exact FLOP counts.

A workload is a float32 ReLU MLP of D Dense layers of width W (W -> W each, the last one linear),
trained with mean-squared error and plain SGD on a batch of B rows. One step = forward +
backward + update. Every contender builds its network from :func:`initial_weights`, so all start
from the same He-normal weights (zero biases).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np

LEARNING_RATE = 1e-3
SEED = 20240607


@dataclass(frozen=True)
class Workload:
    name: str
    depth: int   # D, number of Dense layers
    width: int   # W, every layer is W -> W
    batch: int   # B

    @property
    def widths(self) -> Tuple[int, ...]:
        return (self.width,) * (self.depth + 1)

    @property
    def sqrt_k(self) -> int:
        return max(1, math.isqrt(self.depth))

    @property
    def intervals(self) -> List[int]:
        """checkpoint_every values benchmarked: 1 (plain backprop) and floor(sqrt(D))."""
        return sorted({1, self.sqrt_k})

    def as_dict(self) -> dict:
        return asdict(self)


FULL = [
    Workload("small", 64, 64, 32),
    Workload("medium", 32, 256, 64),
    Workload("large", 8, 1024, 256),
    Workload("deep", 256, 256, 64),
]

# --quick: every code path on tiny sizes, a few seconds in all.
QUICK = [
    Workload("small", 9, 16, 8),
    Workload("deep", 16, 32, 8),
]

WORKLOADS: Dict[str, Workload] = {w.name: w for w in FULL}


def initial_weights(w: Workload, seed: int = SEED):
    """He-normal weights (std sqrt(2 / in)) for every layer, zero biases; float32.

    The last (linear) layer gets the same init. Raises if any value is subnormal.
    """
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for i in range(w.depth):
        fan_in, fan_out = w.widths[i], w.widths[i + 1]
        weights.append(rng.normal(0.0, math.sqrt(2.0 / fan_in), (fan_in, fan_out)).astype(np.float32))
        biases.append(np.zeros(fan_out, np.float32))
    bad = sum(count_subnormals(a) for a in weights)
    if bad:
        raise AssertionError(f"{bad} subnormal initial weights")
    return weights, biases


def batch_data(w: Workload, seed: int = SEED + 1):
    """Input x (B, W) and regression target t (B, W), standard normal, float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((w.batch, w.widths[0])).astype(np.float32)
    t = rng.standard_normal((w.batch, w.widths[-1])).astype(np.float32)
    return x, t


def count_subnormals(a) -> int:
    a = np.asarray(a)
    tiny = np.finfo(a.dtype).tiny
    mag = np.abs(a)
    return int(np.count_nonzero((mag > 0) & (mag < tiny)))


def uniform_recomputed_layers(depth: int, k: int) -> List[int]:
    """Layers forwarded again in backward by segment checkpointing every k layers (Chen et al.).

    A segment of S layers recomputes its first S - 1: its last output is held (the next segment's
    start, or the network output). k = 1 recomputes nothing.
    """
    if k <= 0 or k > depth:
        k = depth
    out = []
    for start in range(0, depth, k):
        end = min(start + k, depth)
        out.extend(range(start, end - 1))
    return out


def torch_recomputed_layers(depth: int, k: int) -> List[int]:
    """Layers torch.utils.checkpoint.checkpoint_sequential recomputes with ceil(D / k) segments.

    It checkpoints every segment but the last, and recomputes whole segments (their last layer
    too). k = 1 is run without checkpointing (plain autograd), so nothing is recomputed.
    """
    if k == 1:
        return []
    segments = -(-depth // k)
    size = depth // segments
    # checkpoint_sequential: segments of `size` modules, the last one (run plainly) takes the rest.
    return list(range(0, size * (segments - 1)))


def gemm_flops(w: Workload, recomputed: List[int]) -> Dict[str, int]:
    """Exact GEMM FLOPs of one step: 2*B*in*out per GEMM; 3 GEMMs per layer, 1 per recompute."""
    per_layer = [2 * w.batch * w.widths[i] * w.widths[i + 1] for i in range(w.depth)]
    base = 3 * sum(per_layer)
    extra = sum(per_layer[i] for i in recomputed)
    return {"base": base, "recompute": extra, "total": base + extra}
