"""The two runners of a SegmentCheckpointer's steps, behind one interface.

:class:`CompiledRunner` runs a compiled schedule in ckpt's executor (``ckpt._core.Chain``): one
compiled call per phase, GIL released, the arena and gradient buffers reused. :class:`PythonRunner`
runs the same schedule through the layers' own methods, for chains the executor cannot run. Each
returns a pending step from ``forward`` -- what the step holds for its backward -- and
``backward`` consumes it; ``release`` drops one without back-propagating. The tracker counts
the same events on both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ckpt.costs import ChainCosts
from ckpt.elements import Layer, Step
from ckpt.elements._checks import as_batch
from ckpt.schedule import CompiledSchedule
from ckpt.tracker import MemoryUsageTracker


@dataclass
class CompiledStep:
    """A pending step of the compiled executor: its input and output, the arena the forward
    phase left its kept activations in, and the schedule whose backward phase comes next."""

    x: np.ndarray
    y: np.ndarray
    arena: np.ndarray
    schedule: CompiledSchedule
    seed: int = 0       # the step seed its Dropout masks are keyed on

    @property
    def input(self) -> np.ndarray:
        return self.x

    @property
    def output(self) -> np.ndarray:
        return self.y


@dataclass
class PythonStep:
    """A pending step of the Python path: the activations held (index -> array), the schedule
    and the Step its layers key their randomness on."""

    acts: dict
    schedule: CompiledSchedule
    step: Step

    @property
    def seed(self) -> int:
        return self.step.seed

    @property
    def input(self) -> np.ndarray:
        return self.acts[0]

    @property
    def output(self) -> np.ndarray:
        return self.acts[max(self.acts)]


class CompiledRunner:
    """Runs compiled schedules over one ``_core.Chain`` (built from the layers by
    ckpt.executor); keeps the two gradient buffers across steps."""

    name = "compiled"

    def __init__(self, chain, costs: ChainCosts) -> None:
        self.chain = chain
        self.costs = costs
        self._grad_buffers: Optional[np.ndarray] = None

    def forward(self, x: np.ndarray, schedule: CompiledSchedule, seed: int, row0: int,
                training: bool, slices: int, tracker: MemoryUsageTracker,
                release_pending: Callable[[], None]) -> CompiledStep:
        release_pending()   # the executor holds one step's activations at a time
        chain = self.chain
        arena = np.empty(schedule.arena_units * x.shape[0], chain.dtype)
        y = np.empty((x.shape[0], self.costs.widths[-1]), chain.dtype)
        chain.run_forward(schedule.forward_rows, x, y, arena, tracker, seed, row0, training,
                          slices)
        return CompiledStep(x, y, arena, schedule, seed)

    def check_grad_output(self, pending: CompiledStep, grad_output: np.ndarray) -> np.ndarray:
        """grad_output as the backward takes it, or a clear error (the step stays pending)."""
        y = pending.y
        g = as_batch(grad_output, y.shape[1], y.dtype, "grad_output", "SegmentCheckpointer")
        if g.shape[0] != y.shape[0]:
            raise ValueError(f"SegmentCheckpointer: grad_output has {g.shape[0]} rows but the "
                             f"output has {y.shape[0]}")
        return g

    def backward(self, pending: CompiledStep, g: np.ndarray, input_grad: bool,
                 accumulate: bool, tracker: MemoryUsageTracker) -> Optional[np.ndarray]:
        x = pending.x
        grad_input = np.empty_like(x) if input_grad else None
        self.chain.run_backward(pending.schedule.backward_rows, g, pending.arena,
                                self._gradient_buffers(x.shape[0], x.dtype), grad_input,
                                tracker, accumulate)
        return grad_input

    def _gradient_buffers(self, batch: int, dtype: np.dtype) -> np.ndarray:
        """Two gradient buffers of the widest activation, kept across steps."""
        size = self.costs.gradient_buffer_values(batch)
        buf = self._grad_buffers
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._grad_buffers = np.empty(size, dtype)
        return buf

    def release(self, pending: CompiledStep, tracker: MemoryUsageTracker) -> None:
        tracker.release_stored_activation(self.pending_bytes(pending))

    def pending_bytes(self, pending: CompiledStep) -> int:
        """Bytes the tracker counts for a pending step: what its forward phase left held."""
        x = pending.x
        return pending.schedule.trace.held_after_forward_units * x.shape[0] * x.itemsize

    def zero_grad(self) -> None:
        self.chain.zero_grad()

    def sgd_update(self, learning_rate: float) -> None:
        self.chain.sgd_update(learning_rate)


class PythonRunner:
    """Runs schedules through the layers' own methods (any Layer works)."""

    name = "python"

    def __init__(self, layers: Sequence[Layer], costs: Optional[ChainCosts],
                 dtype: Optional[np.dtype]) -> None:
        self.layers = layers
        self.costs = costs
        self.dtype = dtype

    def forward(self, x: np.ndarray, schedule: CompiledSchedule, step: Step,
                tracker: MemoryUsageTracker, release_pending: Callable[[], None]) -> PythonStep:
        acts = {0: x}
        tracker.record_stored_activation(x.nbytes)
        try:
            _python_run(self.layers, schedule, schedule.ops[:schedule.trace.forward_length],
                        acts, None, step, tracker)
        except BaseException:
            # A layer refused: release what this forward held, keep the previous forward.
            _release_all(acts, tracker)
            raise
        release_pending()
        return PythonStep(acts, schedule, step)

    def check_grad_output(self, pending: PythonStep, grad_output: np.ndarray) -> np.ndarray:
        """grad_output as the backward takes it, or a clear error (the step stays pending)."""
        y = pending.acts[len(self.layers)]
        if self.dtype is not None and self.costs is not None:
            grad_output = as_batch(grad_output, self.costs.widths[-1], self.dtype,
                                   "grad_output", "SegmentCheckpointer")
        if not isinstance(grad_output, np.ndarray) or grad_output.shape != y.shape:
            raise ValueError(f"SegmentCheckpointer: grad_output must be an array of the "
                             f"output's shape {y.shape}, got "
                             f"{getattr(grad_output, 'shape', type(grad_output))}")
        return grad_output

    def backward(self, pending: PythonStep, grad_output: np.ndarray, input_grad: bool,
                 accumulate: bool, tracker: MemoryUsageTracker) -> Optional[np.ndarray]:
        acts, schedule = pending.acts, pending.schedule
        if not accumulate:
            for layer in self.layers:
                layer.zero_grad()
        try:
            grad_input = _python_run(self.layers, schedule,
                                     schedule.ops[schedule.trace.forward_length:], acts,
                                     grad_output, pending.step, tracker)
            return grad_input if input_grad else None
        except BaseException:
            _release_all(acts, tracker)
            raise

    def release(self, pending: PythonStep, tracker: MemoryUsageTracker) -> None:
        _release_all(pending.acts, tracker)

    def pending_bytes(self, pending: PythonStep) -> int:
        return sum(value.nbytes for value in pending.acts.values())

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.zero_grad()

    def sgd_update(self, learning_rate: float) -> None:
        for layer in self.layers:
            layer.update(learning_rate)


def _release_all(acts: dict, tracker: MemoryUsageTracker) -> None:
    for value in acts.values():
        tracker.release_stored_activation(value.nbytes)
    acts.clear()


def _python_run(layers: Sequence[Layer], compiled: CompiledSchedule, ops, acts: dict, grad,
                step: Step, tracker: MemoryUsageTracker):
    """Run schedule operations through the layers' own methods.

    ``acts`` (activation index -> array) is updated in place. A forward phase (grad None)
    returns None; a backward phase returns the input gradient. The scratch the elements'
    descriptions declare is recorded in the tracker while each operation runs.
    """
    # In the forward phase every layer runs for the first time; in backward, again.
    ran = set() if grad is None else set(range(len(layers)))
    held_grad = 0  # bytes of the gradient ckpt holds between two layers (not the caller's)
    fwd_scratch = compiled.costs.forward_scratch
    bwd_scratch = compiled.costs.backward_scratch(False)
    try:
        for kind, i in ops:
            if kind == "forward":
                transient = fwd_scratch[i] * acts[i].shape[0] * acts[i].itemsize
                tracker.record_stored_activation(transient)
                try:
                    y = layers[i].forward_step(acts[i], step)
                finally:
                    tracker.release_stored_activation(transient)
                acts[i + 1] = y
                tracker.record_stored_activation(y.nbytes)
                if i in ran:
                    tracker.record_recomputed(y.nbytes)
                ran.add(i)
            elif kind == "backward":
                row_bytes = acts[i].shape[0] * acts[i].itemsize
                transient = bwd_scratch[i] * row_bytes
                tracker.record_stored_activation(transient)
                # A layer's own backward rebuilds its internals (a Residual's): recomputed too.
                tracker.record_recomputed(compiled.costs.elements[i].tape * row_bytes)
                try:
                    grad = layers[i].backward_step(acts[i], grad, step, output=acts[i + 1])
                finally:
                    tracker.release_stored_activation(transient)
                tracker.record_gradient(grad.nbytes)
                tracker.release_gradient(held_grad)
                held_grad = grad.nbytes
                tracker.release_stored_activation(acts.pop(i + 1).nbytes)
            elif i in acts:
                tracker.release_stored_activation(acts.pop(i).nbytes)
    finally:
        tracker.release_gradient(held_grad)
    return grad
