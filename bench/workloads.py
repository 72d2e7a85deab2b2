"""Workloads of the benchmark: shapes, the shared initial weights, and exact FLOP counts.

A workload is trained with mean-squared error and plain SGD on a batch of B rows, float32; one
step = forward + backward + update. Two kinds:

- ``mlp``: a ReLU MLP of D Dense layers of width W (W -> W each, the last one linear); a chain
  of D elements. Every contender builds it from :func:`initial_weights`.
- ``resmlp``: the pre-norm residual MLP of ``ckpt.build_mlp(residual=True)``: an input
  projection Dense(W -> W, linear), D residual blocks x + Dense2(ReLU(Dense1(LayerNorm(x)))),
  a final LayerNorm and a linear output Dense(W -> W); a chain of D + 3 elements (a block is
  one element). Every contender builds it from :func:`initial_resmlp_params`.

All start from the same He-normal weights, zero biases, LayerNorm weight 1 and bias 0.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np

LEARNING_RATE = 1e-3
SEED = 20240607


KINDS = ("mlp", "resmlp")
LAYERNORM_EPS = 1e-5


@dataclass(frozen=True)
class Workload:
    name: str
    depth: int   # D: Dense layers (kind "mlp") or residual blocks (kind "resmlp")
    width: int   # W: every Dense is W -> W
    batch: int   # B
    kind: str = "mlp"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Workload kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def n_elements(self) -> int:
        """Chain elements N: D Dense layers, or projection + D blocks + LayerNorm + output."""
        return self.depth if self.kind == "mlp" else self.depth + 3

    @property
    def widths(self) -> Tuple[int, ...]:
        """Activation widths a_0 .. a_N (all W)."""
        return (self.width,) * (self.n_elements + 1)

    @property
    def dense_per_element(self) -> Tuple[int, ...]:
        """W x W Dense layers inside each chain element (a block has two, a LayerNorm none)."""
        if self.kind == "mlp":
            return (1,) * self.depth
        return (1,) + (2,) * self.depth + (0, 1)

    @property
    def sqrt_k(self) -> int:
        return max(1, math.isqrt(self.n_elements))

    @property
    def intervals(self) -> List[int]:
        """checkpoint_every values benchmarked: 1 (plain backprop) and floor(sqrt(N))."""
        return sorted({1, self.sqrt_k})

    @property
    def label(self) -> str:
        """Shape for tables: "D×W" or "D blocks×W"."""
        return (f"{self.depth}×{self.width}" if self.kind == "mlp"
                else f"{self.depth} blocks×{self.width}")

    def as_dict(self) -> dict:
        return asdict(self)


FULL = [
    Workload("small", 64, 64, 32),
    Workload("medium", 32, 256, 64),
    Workload("large", 8, 1024, 256),
    Workload("deep", 256, 256, 64),
    Workload("resmlp", 64, 256, 64, kind="resmlp"),   # 67 elements: k = 8
]

# --quick: every code path on tiny sizes, a few seconds in all.
QUICK = [
    Workload("small", 9, 16, 8),
    Workload("deep", 16, 32, 8),
    Workload("resmlp", 6, 16, 8, kind="resmlp"),      # 9 elements: k = 3
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


def ckpt_dense_layers(w: Workload) -> list:
    """The workload's ReLU MLP as ckpt Dense layers (the last one linear), holding
    :func:`initial_weights` (imports ckpt: only the ckpt contenders call it)."""
    from ckpt.layers import Dense
    weights, biases = initial_weights(w)
    layers = []
    for i in range(w.depth):
        layer = Dense(w.widths[i], w.widths[i + 1], "relu" if i < w.depth - 1 else None,
                      dtype=np.float32, rng=i)
        layer.set_params([weights[i], biases[i]])
        layers.append(layer)
    return layers


def initial_resmlp_params(w: Workload, seed: int = SEED) -> List[np.ndarray]:
    """The residual MLP's parameters, float32, flat in ``params()`` order of the ckpt model:
    projection W, b; per block LayerNorm weight, bias, Dense1 W, b, Dense2 W, b; final
    LayerNorm weight, bias; output W, b. Dense weights are (in, out) (torch's weight.T).

    He-normal Dense weights (std sqrt(2 / in)), zero biases, LayerNorm weight 1 and bias 0; each
    block's Dense2 is scaled by 1 / D, as ``ckpt.build_mlp(residual=True)`` does.
    Raises if any value is subnormal.
    """
    if w.kind != "resmlp":
        raise ValueError(f"workload {w.name} is of kind {w.kind!r}, not 'resmlp'")
    rng = np.random.default_rng(seed)
    n = w.width

    def dense(scale: float = 1.0):
        W = rng.normal(0.0, math.sqrt(2.0 / n), (n, n)) * scale
        return [W.astype(np.float32), np.zeros(n, np.float32)]

    def norm():
        return [np.ones(n, np.float32), np.zeros(n, np.float32)]

    params = dense()
    branch_scale = 1.0 / w.depth
    for _ in range(w.depth):
        params += norm() + dense() + dense(branch_scale)
    params += norm() + dense()
    bad = sum(count_subnormals(a) for a in params)
    if bad:
        raise AssertionError(f"{bad} subnormal initial parameters")
    return params


def split_resmlp_params(w: Workload, params: List[np.ndarray]) -> dict:
    """The flat list of :func:`initial_resmlp_params` by part: "proj" (W, b), "blocks" (one
    (ln_w, ln_b, W1, b1, W2, b2) per block), "norm" (w, b), "head" (W, b)."""
    if len(params) != 6 * w.depth + 6:
        raise ValueError(f"a residual MLP of {w.depth} blocks has {6 * w.depth + 6} parameter "
                         f"arrays, got {len(params)}")
    blocks = [tuple(params[2 + 6 * i: 8 + 6 * i]) for i in range(w.depth)]
    return {"proj": tuple(params[:2]), "blocks": blocks, "norm": tuple(params[-4:-2]),
            "head": tuple(params[-2:])}


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
    """Elements (layers, blocks) forwarded again in backward by segment checkpointing every k layers (Chen et al.).

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
    """Elements (modules of the nn.Sequential) torch.utils.checkpoint.checkpoint_sequential recomputes with ceil(D / k) segments.

    It checkpoints every segment but the last, and recomputes whole segments (their last layer
    too). k = 1 is run without checkpointing (plain autograd), so nothing is recomputed.
    """
    if k == 1:
        return []
    segments = -(-depth // k)
    size = depth // segments
    # checkpoint_sequential: segments of `size` modules, the last one (run plainly) takes the rest.
    return list(range(0, size * (segments - 1)))


def recomputed_gemms(w: Workload, contender: str, k: int) -> int:
    """W x W forward GEMMs a contender runs again in one step at checkpoint_every k.

    - ckpt: the elements of :func:`uniform_recomputed_layers`; a recomputed segment keeps its
      blocks' internals, but a block whose output is a checkpoint read again by a recomputation
      after backwards ran (the start of any segment but the first and the last) does not, and
      its backward rebuilds its body (both Dense layers) first.
    - numpy: the same segments; a recomputation keeps the blocks' internals, so nothing is
      rebuilt twice; a segment's last element is not run again, except a block's first Dense
      (its backward needs that Dense's output; the second Dense's output it does not need).
    - torch: checkpoint_sequential recomputes whole segments (internals kept while it does).
    """
    per = w.dense_per_element
    n = w.n_elements
    if contender == "torch":
        return sum(per[i] for i in torch_recomputed_layers(n, k))
    rec = uniform_recomputed_layers(n, k)
    count = sum(per[i] for i in rec)
    if k == 1 or w.kind == "mlp":
        return count
    if contender == "ckpt":
        kk = n if k <= 0 or k > n else k
        starts = list(range(0, n, kk))
        return count + 2 * sum(1 for start in starts[1:-1] if 1 <= start - 1 <= w.depth)
    if contender == "numpy":
        kk = n if k <= 0 or k > n else k
        ends = [min(start + kk, n) - 1 for start in range(0, n, kk)]
        return count + sum(1 for i in ends if 1 <= i <= w.depth)   # block i is element i
    raise ValueError(f"unknown contender {contender!r}")


def gemm_flops(w: Workload, recomputed_gemm_count: int = 0) -> Dict[str, int]:
    """Exact GEMM FLOPs of one step: 2*B*W*W per GEMM; 3 GEMMs per Dense layer (forward, weight
    gradient, input gradient), 1 per recomputed Dense forward."""
    per_gemm = 2 * w.batch * w.width * w.width
    base = 3 * per_gemm * sum(w.dense_per_element)
    extra = per_gemm * recomputed_gemm_count
    return {"base": base, "recompute": extra, "total": base + extra}
