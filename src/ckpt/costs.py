"""What a chain element costs: one description per element, the only source of costs.

Every layer describes itself once with :class:`ElementCost` (``Layer.describe``): its widths, what
it stores, the scratch it needs, its FLOPs and its parameters. Each kind's cost function sits in
its own module of :mod:`ckpt.elements` (``dense_cost``, ``layernorm_cost``, ...). The planner's cost model, the
schedule compiler (arena and workspace sizes), the checkpointer, the tracker and the CLI's reports
all read these descriptions, through :class:`ChainCosts`; none of them has a formula of its own.

Sizes are counted in *elements per batch row* of the chain's dtype (multiply by the batch size
and the item size for bytes), FLOPs per batch row.

An element's backward needs its input and its output (both chain activations). A compound
element (a Residual block) also needs its *internals*, the activations inside it: plain backprop
keeps them beside the output (``tape``); every other schedule recomputes them inside the
element's backward, where they count as scratch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True, slots=True)
class ElementCost:
    """The costs of one chain element, per batch row.

    - ``in_width`` / ``out_width``: features in and out.
    - ``stored``: elements held when the element's output is kept (its output, ``out_width``).
    - ``tape``: internal elements its backward needs; plain backprop keeps them with the output,
      other schedules recompute them in the backward (then they are backward scratch).
    - ``forward_scratch``: transient elements during its forward.
    - ``backward_scratch``: transient elements during its backward, beyond the tape.
    - ``forward_flops``: FLOPs of its forward; ``backward_flops``: of its backward (input
      gradient included); ``internal_flops``: the forward FLOPs its backward repeats when the
      tape is not kept.
    - ``params`` / ``gradients``: its parameter arrays and their gradients (empty when the
      description was built from shapes alone); ``parameter_count``: their total size.
    - ``reads_output``: whether its backward needs its output (or a buffer its size); inside a
      Residual body, the output of a last element that does not is never kept or rebuilt.
    - ``step_state``: values the element holds for the step whatever the batch size, from its
      first forward to its backward (BatchNorm's batch mean and variance, 2 x features).
    """

    kind: str
    in_width: int
    out_width: int
    stored: int
    forward_flops: int
    backward_flops: int
    tape: int = 0
    forward_scratch: int = 0
    backward_scratch: int = 0
    internal_flops: int = 0
    parameter_count: int = 0
    reads_output: bool = True
    step_state: int = 0
    params: Tuple[np.ndarray, ...] = field(default=(), compare=False, repr=False)
    gradients: Tuple[np.ndarray, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise TypeError(f"ElementCost.kind must be a non-empty string, got {self.kind!r}")
        for name in ("in_width", "out_width", "stored", "forward_flops", "backward_flops",
                     "tape", "forward_scratch", "backward_scratch", "internal_flops",
                     "parameter_count", "step_state"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"ElementCost.{name} must be a non-negative integer, "
                                 f"got {value!r}")
        if self.in_width == 0 or self.out_width == 0:
            raise ValueError(f"{self.kind}: widths must be positive, got "
                             f"{self.in_width} -> {self.out_width}")

    @property
    def costs(self) -> tuple:
        """The numbers alone (what makes two elements cost the same)."""
        return (self.in_width, self.out_width, self.stored, self.tape, self.forward_scratch,
                self.backward_scratch, self.forward_flops, self.backward_flops,
                self.internal_flops, self.reads_output, self.step_state)

    def backward_transient(self, keep_internals: bool) -> int:
        """Scratch held during the backward: the tape too when it was not kept."""
        return self.backward_scratch + (0 if keep_internals else self.tape)

    def held(self, keep_internals: bool) -> int:
        """Elements held while the output is kept."""
        return self.stored + (self.tape if keep_internals else 0)


@dataclass(frozen=True)
class ChainCosts:
    """The descriptions of a chain's elements, checked to connect, and what follows from them
    (the per-activation tuples are computed once: the training step reads them).

    Activation a_0 is the chain's input (``in_width`` of element 0 elements per row), a_{i+1}
    the output of element i (``stored`` elements per row).
    """

    elements: Tuple[ElementCost, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.elements, (tuple, list)):
            raise TypeError(f"ChainCosts.elements must be a tuple of ElementCost, got "
                            f"{type(self.elements).__name__}")
        elements = tuple(self.elements)
        if not elements:
            raise ValueError("a chain needs at least one element")
        for i, e in enumerate(elements):
            if not isinstance(e, ElementCost):
                raise TypeError(f"element {i}: expected an ElementCost, got {type(e).__name__}")
            if i and e.in_width != elements[i - 1].out_width:
                raise ValueError(f"element {i} ({e.kind}) expects {e.in_width} input features, "
                                 f"but element {i - 1} ({elements[i - 1].kind}) produces "
                                 f"{elements[i - 1].out_width}")
        object.__setattr__(self, "elements", elements)

    def __len__(self) -> int:
        return len(self.elements)

    @property
    def n(self) -> int:
        return len(self.elements)

    @cached_property
    def widths(self) -> Tuple[int, ...]:
        """Feature widths of a_0 .. a_N."""
        return (self.elements[0].in_width,) + tuple(e.out_width for e in self.elements)

    @cached_property
    def stored(self) -> Tuple[int, ...]:
        """Elements per row held for a_0 .. a_N (outputs only, no tapes)."""
        return (self.elements[0].in_width,) + tuple(e.stored for e in self.elements)

    @cached_property
    def forward_flops(self) -> Tuple[int, ...]:
        return tuple(e.forward_flops for e in self.elements)

    @cached_property
    def forward_scratch(self) -> Tuple[int, ...]:
        return tuple(e.forward_scratch for e in self.elements)

    def backward_scratch(self, keep_internals: bool = False) -> Tuple[int, ...]:
        return tuple(e.backward_transient(keep_internals) for e in self.elements)

    @property
    def has_internals(self) -> bool:
        """Whether some element has a tape (plain backprop then differs from k = 1 without it)."""
        return any(e.tape for e in self.elements)

    @property
    def uniform(self) -> bool:
        """Whether every element costs the same (not only the same widths)."""
        return len({e.costs for e in self.elements}) == 1 and self.widths[0] == self.widths[1]

    def gradient_width(self) -> int:
        """Width of each of the two chain-level gradient buffers (the widest activation)."""
        return max(self.widths)

    def gradient_buffer_values(self, batch_size: int) -> int:
        """Values of the two chain-level gradient buffers the compiled backward ping-pongs
        between, at this batch size."""
        return 2 * batch_size * self.gradient_width()

    def gradient_copy_values(self, slices: int) -> int:
        """Values of the parameter-gradient copies a step split into ``slices`` batch slices
        holds: one copy of every gradient for each slice after the first."""
        return max(0, slices - 1) * self.parameter_count()

    def gradient_workspace_bytes(self, batch_size: int, slices: int, itemsize: int) -> int:
        """Bytes of the gradient workspace of a compiled backward, outside a plan's peak: the
        two gradient buffers and the split copies."""
        return (self.gradient_buffer_values(batch_size)
                + self.gradient_copy_values(slices)) * itemsize

    def step_flops(self, input_grad: bool = False) -> int:
        """FLOPs per row of one plain training step: every forward, every backward (the first
        element's input gradient is skipped unless ``input_grad``; for Dense that is one GEMM)."""
        first = self.elements[0]
        skipped = 0 if input_grad or first.kind != "dense" else 2 * first.in_width * first.out_width
        return sum(e.forward_flops + e.backward_flops for e in self.elements) - skipped

    def parameter_count(self) -> int:
        return sum(e.parameter_count for e in self.elements)

    def step_state(self) -> int:
        """Values the elements hold for a step whatever its batch size (BatchNorm's batch
        statistics)."""
        return sum(e.step_state for e in self.elements)

    def min_units(self) -> int:
        """The least peak (elements per row) of any schedule: element i's forward or backward
        needs a_0, a_i, a_{i+1} and its transient scratch at once."""
        s, fs, bs = self.stored, self.forward_scratch, self.backward_scratch(False)
        return max((s[0] if i else 0) + s[i] + s[i + 1] + max(fs[i], bs[i])
                   for i in range(self.n))


def describe_chain(layers: Sequence, in_width: Optional[int] = None) -> Optional[ChainCosts]:
    """The chain's descriptions from its layers, or None when a layer cannot describe itself
    (a custom layer without widths). Raises ValueError when described layers do not connect."""
    width = in_width if in_width is not None else infer_input_width(layers)
    elements = []
    for i, layer in enumerate(layers):
        try:
            cost = layer.describe(width)
        except _Undescribable:
            return None
        if not isinstance(cost, ElementCost):
            raise TypeError(f"layer {i} ({type(layer).__name__}).describe() returned "
                            f"{type(cost).__name__}, not an ElementCost")
        if width is not None and cost.in_width != width:
            raise ValueError(f"layer {i} ({layer.layer_type}) expects {cost.in_width} input "
                             f"features, but the layer before produces {width}")
        elements.append(cost)
        width = cost.out_width
    return ChainCosts(tuple(elements)) if elements else None


def infer_input_width(layers: Sequence) -> Optional[int]:
    """The chain's input width: the first layer that declares ``in_features`` decides, through
    any width-preserving layers before it (Dropout)."""
    for layer in layers:
        width = getattr(layer, "in_features", None)
        if width is not None:
            return int(width)
        if not getattr(layer, "preserves_width", False):
            return None
    return None


class _Undescribable(Exception):
    """Raised by Layer.describe when a custom layer declares no widths."""
