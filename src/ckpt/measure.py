"""Measurements of a model's training step: peak activation memory and recomputation cost.

Both work on copies or descriptions, never on the model being trained: ``ckpt train`` reports
them after training, and scripts can call them on any list of layers.
"""
from __future__ import annotations

import copy
from typing import Sequence, Tuple

import numpy as np

from ckpt.checkpoint import SegmentCheckpointer
from ckpt.losses import get_loss


def measure_step(layers: Sequence, xb: np.ndarray, yb: np.ndarray, *,
                 loss: str = "cross_entropy", **schedule) -> int:
    """Peak activation bytes of one training step with ``loss`` on copies of the layers.

    ``schedule`` is what SegmentCheckpointer takes: checkpoint_every=, or budget_bytes=.
    """
    model = SegmentCheckpointer(copy.deepcopy(list(layers)), **schedule)
    output = model.forward(xb)
    if loss != "cross_entropy":
        yb = np.asarray(yb, dtype=output.dtype).reshape(len(yb), -1)
    _, grad = get_loss(loss)(output, yb)
    model.backward(grad)
    return model.memory_tracker.peak_bytes


def recompute_cost(model: SegmentCheckpointer, batch: int) -> Tuple[int, float]:
    """(recomputed element forwards per step, the FLOPs they and the recomputed internals of
    compound elements cost, as a fraction of a plain step), from the elements' descriptions.

    A plain step is every element's forward and backward (the first element's input gradient
    aside).
    """
    costs = model.costs
    compiled = model.schedule(batch)
    flops = costs.forward_flops
    extra = sum(flops[i] for i in compiled.recomputed_layers)
    extra += sum(costs.elements[i].internal_flops for i in compiled.rebuilt_layers)
    return len(compiled.recomputed_layers), extra / costs.step_flops()
