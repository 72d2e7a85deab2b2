"""CheckpointedLayer and SegmentCheckpointer: keep few activations, recompute the rest.

Unlike scirs2-neural's module these really free memory: layers keep no activations of their own,
so what a checkpointer releases is gone; each segment is recomputed once per backward (not once
per layer); and the tracker's figures go down again when memory is released.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, List, Optional, Sequence

import numpy as np

from ckpt import _core
from ckpt.layers import Dense, Layer, _check_learning_rate, as_batch
from ckpt.schedule import CompiledSchedule, compile_schedule, uniform_ops
from ckpt.tracker import MemoryUsageTracker


class CheckpointStateError(RuntimeError, ValueError):
    """A checkpointer was used out of order (backward before forward, backward twice).

    Both a RuntimeError and a ValueError, so either ``except`` clause catches it.
    """


def _check_tracker(tracker: object) -> MemoryUsageTracker:
    if tracker is None:
        return MemoryUsageTracker()
    if not isinstance(tracker, MemoryUsageTracker):
        raise TypeError(f"tracker must be a MemoryUsageTracker, got {type(tracker).__name__}")
    return tracker


def _check_layer(layer: object, where: str) -> Layer:
    if not isinstance(layer, Layer):
        raise TypeError(f"{where} must be a ckpt Layer, got {type(layer).__name__}")
    return layer


class CheckpointedLayer(Layer):
    """Wraps one layer: forward keeps only its input; backward recomputes the layer from it.

    The input is kept by reference, not copied: do not modify it in place between forward and
    backward. A new forward replaces (and releases) the input kept by the previous one.
    """

    def __init__(self, layer: Layer, tracker: Optional[MemoryUsageTracker] = None) -> None:
        self.inner = _check_layer(layer, "the wrapped layer")
        if isinstance(layer, CheckpointedLayer):
            raise TypeError("a CheckpointedLayer cannot wrap another CheckpointedLayer")
        self.memory_tracker = _check_tracker(tracker)
        self._stored: Optional[np.ndarray] = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The inner layer's output; in training mode the input is kept for backward.

        In evaluation mode nothing is kept, and an input kept by an earlier training forward
        stays for its backward.
        """
        y = self.inner.forward(x)
        if not self.is_training:
            return y
        self._drop_stored()
        self._stored = x
        self.memory_tracker.record_stored_activation(x.nbytes)
        return y

    def backward(self, x: np.ndarray, grad_output: np.ndarray, *,
                 output: Optional[np.ndarray] = None) -> np.ndarray:
        """Recompute the inner forward from the kept input, then back-propagate through it.

        ``x`` must match the kept input's shape (the kept one is used); ``output`` is ignored,
        since recomputing it is the point.
        """
        stored = self._stored
        if stored is None:
            raise CheckpointStateError(
                f"{self.layer_description}: backward needs a forward first (no input is kept)")
        if getattr(x, "shape", None) != stored.shape:
            raise ValueError(f"{self.layer_type}: backward got an input of shape "
                             f"{getattr(x, 'shape', None)}, but forward kept one of shape "
                             f"{stored.shape}")
        recomputed = self.inner.forward(stored)
        grad_input = self.inner.backward(stored, grad_output, output=recomputed)
        self.memory_tracker.record_recomputed(recomputed.nbytes)
        self._drop_stored()
        return grad_input

    def _drop_stored(self) -> None:
        if self._stored is not None:
            self.memory_tracker.release_stored_activation(self._stored.nbytes)
            self._stored = None

    @property
    def has_stored_input(self) -> bool:
        return self._stored is not None

    # Everything else is the inner layer's.
    def params(self) -> list:
        return self.inner.params()

    def gradients(self) -> list:
        return self.inner.gradients()

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def update(self, learning_rate: float) -> None:
        self.inner.update(learning_rate)

    def set_params(self, params: Sequence[np.ndarray]) -> None:
        self.inner.set_params(params)

    def set_gradients(self, gradients: Sequence[np.ndarray]) -> None:
        self.inner.set_gradients(gradients)

    def set_training(self, training: bool) -> None:
        self.inner.set_training(training)

    @property
    def is_training(self) -> bool:
        return self.inner.is_training

    @property
    def parameter_count(self) -> int:
        return self.inner.parameter_count

    @property
    def layer_type(self) -> str:
        return "CheckpointedLayer"

    @property
    def layer_description(self) -> str:
        return f"CheckpointedLayer({self.inner.layer_description})"

    def __getattr__(self, name: str):
        # Shape facts (in_features, out_features, dtype) come from the inner layer.
        if name in ("in_features", "out_features", "dtype"):
            return getattr(self.inner, name)
        raise AttributeError(name)


def _check_interval(checkpoint_every: object) -> int:
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, numbers.Integral):
        raise TypeError(f"checkpoint_every must be a non-negative integer, "
                        f"got {type(checkpoint_every).__name__} {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 keeps only the input), "
                         f"got {checkpoint_every}")
    return int(checkpoint_every)


class SegmentCheckpointer:
    """Runs a chain of layers keeping only some activations, recomputing the rest in backward.

    ``checkpoint_every=k`` keeps the inputs of layers 0, k, 2k, ...: k=1 is plain backprop,
    k=0 keeps only the network input; the default is floor(sqrt(N)), which brings activation
    memory from O(N) to O(sqrt(N)) for about one extra forward pass. Instead of k, give a
    ``plan`` from :func:`ckpt.plan.plan` (its peak counts activations; the two gradient buffers,
    :meth:`gradient_workspace_bytes`, come on top), or ``budget_bytes`` (an int or a string such
    as "4MiB"): the least recomputation whose activations *and* gradient buffers fit, planned
    for each batch size.

    A chain of Dense layers of one dtype runs in ckpt's typed executor: one compiled call for the
    forward pass and one for the whole backward pass, GIL released, workspaces reused across
    steps. Any other chain runs the same schedule through the layers' Python methods.

    ``forward`` returns a read-only array (it is kept for backward); ``backward`` accumulates
    the parameter gradients and returns the gradient of the input, then releases every stored
    activation. In steady state a step allocates three arrays and nothing else: the arena of
    stored activations (one block, freed when backward ends — that is what lets checkpointing
    give memory back), the output and the input gradient (both handed to the caller). The two
    gradient buffers and the compiled schedule are kept across steps. The instance is not safe
    to use from two threads at once.
    """

    def __init__(self, layers: Iterable[Layer] = (), checkpoint_every: Optional[int] = None, *,
                 tracker: Optional[MemoryUsageTracker] = None, plan=None,
                 budget_bytes: Optional[int] = None) -> None:
        given = [name for name, value in (("checkpoint_every", checkpoint_every), ("plan", plan),
                                          ("budget_bytes", budget_bytes)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of checkpoint_every, plan and budget_bytes, "
                             f"got {' and '.join(given)}")
        self._checkpoint_every = None if checkpoint_every is None else _check_interval(checkpoint_every)
        self._plan = plan
        self._budget = None
        if budget_bytes is not None:
            from ckpt.plan import parse_size
            self._budget = parse_size(budget_bytes) if isinstance(budget_bytes, str) else budget_bytes
            if isinstance(self._budget, bool) or not isinstance(self._budget, numbers.Integral) \
                    or self._budget <= 0:
                raise ValueError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
        self.memory_tracker = _check_tracker(tracker)
        self._layers: List[Layer] = []
        self._chain = None
        self._schedules: dict = {}
        self._row_cache: dict = {}
        for layer in layers:
            self._append(layer)
        if plan is not None:
            self._check_plan(plan)
        self._training = True
        self._state = None
        self._grad_buffers: Optional[np.ndarray] = None

    # ---------------------------------------------------------------- the chain
    def _append(self, layer: Layer) -> None:
        index = len(self._layers)
        _check_layer(layer, f"layer {index}")
        if self._layers:
            prev = self._layers[-1]
            produced = getattr(prev, "out_features", None)
            expected = getattr(layer, "in_features", None)
            if produced is not None and expected is not None and produced != expected:
                raise ValueError(f"layer {index - 1} ({prev.layer_description}) produces "
                                 f"{produced} features but layer {index} "
                                 f"({layer.layer_description}) expects {expected}")
            dt_prev, dt = getattr(prev, "dtype", None), getattr(layer, "dtype", None)
            if dt_prev is not None and dt is not None and np.dtype(dt_prev) != np.dtype(dt):
                raise TypeError(f"layer {index - 1} is {np.dtype(dt_prev)} but layer {index} "
                                f"is {np.dtype(dt)}")
        self._layers.append(layer)
        self._chain = None
        self._schedules: dict = {}
        self._row_cache: dict = {}

    def push(self, layer: Layer) -> None:
        """Append a layer at the end of the chain."""
        if self._state is not None:
            raise CheckpointStateError("cannot add a layer between forward and backward")
        if self._plan is not None:
            raise ValueError("cannot add a layer to a checkpointer that runs a fixed plan")
        self._append(layer)

    @property
    def layers(self) -> List[Layer]:
        return list(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def checkpoint_every(self) -> Optional[int]:
        """The segment length k (None when a plan or a budget decides)."""
        if self._plan is not None or self._budget is not None:
            return None
        if self._checkpoint_every is not None:
            return self._checkpoint_every
        return max(1, math.isqrt(len(self._layers)))

    @property
    def plan(self):
        return self._plan

    @property
    def budget_bytes(self) -> Optional[int]:
        return self._budget

    @property
    def widths(self) -> Optional[tuple]:
        """Activation widths a_0 ... a_N, when every layer declares its features."""
        if not self._layers:
            return None
        ins = [getattr(layer, "in_features", None) for layer in self._layers]
        out = getattr(self._layers[-1], "out_features", None)
        if None in ins or out is None:
            return None
        return tuple(ins) + (out,)

    @property
    def dtype(self) -> Optional[np.dtype]:
        dt = getattr(self._layers[0], "dtype", None) if self._layers else None
        return None if dt is None else np.dtype(dt)

    def _check_plan(self, plan) -> None:
        widths = self.widths
        if widths is None or tuple(plan.widths) != widths:
            raise ValueError(f"the plan is for widths {tuple(plan.widths)}, "
                             f"but the layers have widths {widths}")

    def _typed_chain(self):
        """The typed executor for an all-Dense chain, built once."""
        if self._chain is None and self._layers and all(type(layer) is Dense
                                                        for layer in self._layers):
            layers = self._layers
            self._chain = _core.DenseChain(
                [l.W for l in layers], [l.b for l in layers], [l.grad_W for l in layers],
                [l.grad_b for l in layers], [l._act_code for l in layers],
                [l.negative_slope for l in layers])
        return self._chain

    def schedule(self, batch_size: int) -> CompiledSchedule:
        """The compiled schedule used for a batch size (budgets are planned per batch size)."""
        key = batch_size if self._budget is not None else None
        compiled = self._schedules.get(key)
        if compiled is None:
            n = len(self._layers)
            widths = self.widths or (0,) * (n + 1)
            if self._plan is not None:
                ops = self._plan.ops
            elif self._budget is not None:
                ops = self._plan_for_budget(batch_size).ops
            else:
                ops = uniform_ops(n, self.checkpoint_every)
            compiled = self._schedules[key] = compile_schedule(ops, widths)
        return compiled

    def _plan_for_budget(self, batch_size: int):
        """The least-recomputation plan whose activations and gradient buffers fit the budget."""
        from ckpt.plan import format_size, plan as make_plan
        if self.widths is None or self.dtype is None:
            raise ValueError("budget_bytes needs layers that declare in_features, out_features "
                             "and dtype (Dense layers do)")
        workspace = self.gradient_workspace_bytes(batch_size)
        try:
            return make_plan(list(self.widths), batch_size, max(0, self._budget - workspace),
                             dtype=self.dtype)
        except ValueError as exc:
            raise ValueError(f"budget {format_size(self._budget)} at batch {batch_size}, less "
                             f"{format_size(workspace)} of gradient buffers: {exc}") from None

    def gradient_workspace_bytes(self, batch_size: int) -> int:
        """Bytes of the two gradient buffers a Dense chain keeps (outside a plan's peak)."""
        return 2 * batch_size * max(self.widths) * self.dtype.itemsize

    # ---------------------------------------------------------------- training
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run the chain; in training mode keep what the schedule stores for backward."""
        if not self._layers:
            return x
        chain = self._typed_chain()
        if chain is not None:
            x = as_batch(x, self.widths[0], chain.dtype, "the input", "SegmentCheckpointer")
        elif self.dtype is not None and self.widths is not None:
            # Check what the first layer declares before anything is recorded.
            x = as_batch(x, self.widths[0], self.dtype, "the input", "SegmentCheckpointer")
        elif not isinstance(x, np.ndarray) or x.ndim < 1:
            raise TypeError(f"SegmentCheckpointer: the input must be a numpy array with a batch "
                            f"dimension, got {type(x).__name__}")
        compiled = self.schedule(x.shape[0])
        if chain is not None:
            if self._state is not None:  # the executor holds one step's activations at a time
                self._release()
            forward_rows, backward_rows = self._rows(compiled, x.shape[0])
            arena = np.empty(compiled.arena_units * x.shape[0], chain.dtype)
            y = np.empty((x.shape[0], self.widths[-1]), chain.dtype)
            chain.run_forward(forward_rows, x, y, arena, self.memory_tracker)
            state = ("typed", x, y, arena, backward_rows)
        else:
            acts = {0: x}
            self.memory_tracker.record_stored_activation(x.nbytes)
            try:
                _python_run(self._layers, compiled.ops[:_forward_length(compiled)], acts, None,
                            self.memory_tracker)
            except Exception:
                # A layer refused: release what this forward held, keep the previous forward.
                _release_all(acts, self.memory_tracker)
                raise
            if self._state is not None:
                self._release()
            y = acts[len(self._layers)]
            state = ("python", acts, compiled)
        y.flags.writeable = False
        self._state = state
        if not self._training:
            self._release()
        return y

    def _rows(self, compiled: CompiledSchedule, batch: int):
        """The executor's rows for a batch size, cached."""
        key = (id(compiled), batch)
        rows = self._row_cache.get(key)
        if rows is None:
            rows = self._row_cache[key] = compiled.rows_for_batch(batch)
        return rows

    def backward(self, grad_output: np.ndarray, *, input_grad: bool = True) -> Optional[np.ndarray]:
        """Back-propagate from the gradient of the output; returns the gradient of the input.

        With ``input_grad=False`` a Dense chain skips the first layer's input-gradient product
        (training rarely needs it) and None is returned.
        """
        if not self._layers:
            return grad_output if input_grad else None
        state = self._state
        if state is None:
            raise CheckpointStateError(
                "backward needs a forward first: nothing is stored (backward before forward, "
                "a second backward, or a forward in evaluation mode)")
        if state[0] == "typed":
            _, x, y, arena, backward_rows = state
            g = as_batch(grad_output, y.shape[1], y.dtype, "grad_output", "SegmentCheckpointer")
            if g.shape[0] != y.shape[0]:
                raise ValueError(f"SegmentCheckpointer: grad_output has {g.shape[0]} rows but the "
                                 f"output has {y.shape[0]}")
            grad_input = np.empty_like(x) if input_grad else None
            self._state = None
            self._typed_chain().run_backward(backward_rows, g, arena,
                                             self._gradient_workspace(x.shape[0], x.dtype),
                                             grad_input, self.memory_tracker)
            return grad_input
        _, acts, compiled = state
        y = acts[len(self._layers)]
        if self.dtype is not None and self.widths is not None:
            grad_output = as_batch(grad_output, self.widths[-1], self.dtype, "grad_output",
                                   "SegmentCheckpointer")
        if not isinstance(grad_output, np.ndarray) or grad_output.shape != y.shape:
            raise ValueError(f"SegmentCheckpointer: grad_output must be an array of the output's "
                             f"shape {y.shape}, got {getattr(grad_output, 'shape', type(grad_output))}")
        self._state = None
        try:
            grad_input = _python_run(self._layers, compiled.ops[_forward_length(compiled):], acts,
                                     grad_output, self.memory_tracker)
            return grad_input if input_grad else None
        except Exception:
            _release_all(acts, self.memory_tracker)
            raise

    def _gradient_workspace(self, batch: int, dtype: np.dtype) -> np.ndarray:
        """Two gradient buffers of the widest activation, kept across steps."""
        size = 2 * batch * max(self.widths)
        buf = self._grad_buffers
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self._grad_buffers = np.empty(size, dtype)
        return buf

    def _release(self) -> None:
        """Drop what a forward stored without back-propagating (tracker included)."""
        state, self._state = self._state, None
        if state[0] == "typed":
            _, x, y, arena, backward_rows = state
            kept = self._held_after_forward(x.shape[0])
            self.memory_tracker.release_stored_activation(kept * x.itemsize)
        else:
            _release_all(state[1], self.memory_tracker)

    def _held_after_forward(self, batch: int) -> int:
        """Elements the forward phase leaves held (a_0 and a_N included)."""
        compiled = self.schedule(batch)
        held = {0}
        for kind, i in compiled.ops[:_forward_length(compiled)]:
            if kind == "forward":
                held.add(i + 1)
            else:
                held.discard(i)
        return batch * sum(compiled.widths[i] for i in held)

    def zero_grad(self) -> None:
        """Set every parameter gradient to zero."""
        chain = self._typed_chain()
        if chain is not None:
            chain.zero_grad()
            return
        for layer in self._layers:
            layer.zero_grad()

    def update(self, learning_rate: float) -> None:
        """One plain SGD step on every layer (one compiled call for a Dense chain)."""
        lr = _check_learning_rate(learning_rate)
        if self._state is not None:
            # Backward would recompute with the new weights: wrong gradients, silently.
            raise CheckpointStateError("update between forward and backward would make backward "
                                       "recompute with changed weights; call backward first")
        chain = self._typed_chain()
        if chain is not None:
            chain.sgd_update(lr)
            return
        for layer in self._layers:
            layer.update(lr)

    def params(self) -> list:
        return [p for layer in self._layers for p in layer.params()]

    def gradients(self) -> list:
        return [g for layer in self._layers for g in layer.gradients()]

    def set_training(self, training: bool) -> None:
        """In evaluation mode forward stores nothing (and a backward after it is refused).

        As in PyTorch, a forward run in training mode can still be back-propagated after
        switching to evaluation mode.
        """
        if not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool, got {type(training).__name__}")
        self._training = bool(training)
        for layer in self._layers:
            layer.set_training(training)

    @property
    def is_training(self) -> bool:
        return self._training

    @property
    def parameter_count(self) -> int:
        return sum(layer.parameter_count for layer in self._layers)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def __repr__(self) -> str:
        if self._plan is not None:
            how = "plan"
        elif self._budget is not None:
            how = f"budget_bytes={self._budget}"
        else:
            how = f"checkpoint_every={self.checkpoint_every}"
        return (f"SegmentCheckpointer({len(self._layers)} layers, {how}, "
                f"parameters={self.parameter_count})")

    # ---------------------------------------------------------------- pickling
    # Transient attributes, rebuilt lazily after pickle, copy or deepcopy:
    #   _chain         the compiled executor (C pointers into the layers' arrays)
    #   _schedules     compiled schedules, per batch size
    #   _row_cache     the executor's rows, per schedule and batch size
    #   _grad_buffers  the gradient workspace
    #   _state         a pending forward (what it stored for backward)
    _TRANSIENT = ("_chain", "_schedules", "_row_cache", "_grad_buffers", "_state")

    def __getstate__(self) -> dict:
        """The layers, schedule settings, tracker and mode; a pending forward is dropped.

        A copy made between forward and backward has nothing stored: its backward raises
        CheckpointStateError until it runs a forward, and its tracker (a copy of this one)
        no longer counts the dropped activations. The original keeps its pending forward.
        """
        state = {key: value for key, value in self.__dict__.items()
                 if key not in self._TRANSIENT}
        state["_pending_bytes"] = self._pending_bytes()
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        pending = state.pop("_pending_bytes", 0)
        self.__dict__.update(state)
        self._chain = None
        self._schedules = {}
        self._row_cache = {}
        self._grad_buffers = None
        self._state = None
        if pending:
            self.memory_tracker.release_stored_activation(pending)

    def _pending_bytes(self) -> int:
        """Bytes the tracker counts for a pending forward (0 when there is none)."""
        state = self._state
        if state is None:
            return 0
        if state[0] == "typed":
            x = state[1]
            return self._held_after_forward(x.shape[0]) * x.itemsize
        return sum(value.nbytes for value in state[1].values())


def _forward_length(compiled: CompiledSchedule) -> int:
    """How many of the schedule's operations make up its forward phase."""
    return len(compiled.forward_rows)


def _release_all(acts: dict, tracker: MemoryUsageTracker) -> None:
    for value in acts.values():
        tracker.release_stored_activation(value.nbytes)
    acts.clear()


def _python_run(layers: Sequence[Layer], ops, acts: dict, grad, tracker: MemoryUsageTracker):
    """Run schedule operations through the layers' own methods (any Layer works).

    ``acts`` (activation index -> array) is updated in place. A forward phase (grad None)
    returns None; a backward phase returns the input gradient.
    """
    # In the forward phase every layer runs for the first time; in backward, again.
    ran = set() if grad is None else set(range(len(layers)))
    held_grad = 0  # bytes of the gradient ckpt holds between two layers (not the caller's)
    try:
        for kind, i in ops:
            if kind == "forward":
                y = layers[i].forward(acts[i])
                acts[i + 1] = y
                tracker.record_stored_activation(y.nbytes)
                if i in ran:
                    tracker.record_recomputed(y.nbytes)
                ran.add(i)
            elif kind == "backward":
                grad = layers[i].backward(acts[i], grad, output=acts[i + 1])
                tracker.record_gradient(grad.nbytes)
                tracker.release_gradient(held_grad)
                held_grad = grad.nbytes
                tracker.release_stored_activation(acts.pop(i + 1).nbytes)
            elif i in acts:
                tracker.release_stored_activation(acts.pop(i).nbytes)
    finally:
        tracker.release_gradient(held_grad)
    return grad
