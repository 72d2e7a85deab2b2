"""ckpt: gradient checkpointing for deep fully-connected networks on CPU.

Store a few activations in the forward pass, recompute the rest in the backward pass: activation
memory falls from O(N) to O(sqrt(N)) for N layers, for about one extra forward pass.
"""
# Preload the OpenBLAS of the scipy-openblas32 wheel before the extension that links to it.
import scipy_openblas32  # noqa: F401

from ckpt._core import get_num_threads, set_num_threads, simd_variant
from ckpt.checkpoint import CheckpointedLayer, CheckpointStateError, SegmentCheckpointer
from ckpt.io import ModelFileError, load, load_model, save
from ckpt.costs import ChainCosts, ElementCost
from ckpt.elements import Activation, BatchNorm, Dense, Dropout, Layer, LayerNorm, Residual
from ckpt.losses import mse_loss, softmax_cross_entropy
from ckpt.optim import SGD, Adam, AdamW
from ckpt.predictor import load_predictor
from ckpt.threads import get_threading_mode, threading_mode
from ckpt.tracker import MemoryUsageTracker
from ckpt.train import build_mlp, evaluate, fit, predict

from ckpt._version import __version__

_ESTIMATORS = ("MLPClassifier", "MLPRegressor")


def __getattr__(name: str):
    # The scikit-learn estimators load on first use, so that ckpt needs scikit-learn only then
    # (ckpt.estimators raises an ImportError naming the ckpt-cpu[sklearn] extra without it).
    if name in _ESTIMATORS:
        from ckpt import estimators
        return getattr(estimators, name)
    raise AttributeError(f"module 'ckpt' has no attribute {name!r}")

# Bound ckpt's threads by the cores it may use (affinity mask, cgroup quota); see ckpt.threads.
from ckpt.threads import apply_default_num_threads as _apply_default_num_threads

_apply_default_num_threads()

__all__ = [
    "SGD",
    "Activation",
    "Adam",
    "AdamW",
    "BatchNorm",
    "CheckpointStateError",
    "ChainCosts",
    "CheckpointedLayer",
    "Dense",
    "Dropout",
    "ElementCost",
    "Layer",
    "LayerNorm",
    "MemoryUsageTracker",
    "ModelFileError",
    "Residual",
    "SegmentCheckpointer",
    "build_mlp",
    "evaluate",
    "fit",
    "get_num_threads",
    "get_threading_mode",
    "load",
    "load_model",
    "load_predictor",
    "mse_loss",
    "predict",
    "save",
    "set_num_threads",
    "simd_variant",
    "softmax_cross_entropy",
    "threading_mode",
    "__version__",
]
