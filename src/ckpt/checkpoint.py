"""CheckpointedLayer and SegmentCheckpointer: keep few activations, recompute the rest.

Unlike scirs2-neural's module these really free memory: layers keep no activations of their own,
so what a checkpointer releases is gone; each segment is recomputed once per backward (not once
per layer); and the tracker's figures go down again when memory is released.
"""
from __future__ import annotations

import numbers
import threading
import zlib
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

from ckpt.costs import ChainCosts, ElementCost, describe_chain
from ckpt.executor import build_chain
from ckpt.elements import Layer, Step, dropout_streams, new_step, walk
from ckpt.elements._checks import _as_generator, _check_learning_rate, as_batch
from ckpt.policy import SchedulePolicy
from ckpt.runners import CompiledRunner, PythonRunner
from ckpt.schedule import CompiledSchedule
from ckpt.threads import (FIXED_MODES, blas_threads, check_mode, choose_slices,
                          get_threading_mode, requested_num_threads)
from ckpt.tuning import Config, ThreadsTuner, timed
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
    backward. A new forward replaces (and releases) the input kept by the previous one. The
    recomputation replays the forward's step, so Dropout masks inside are the same (PyTorch's
    ``preserve_rng_state``); on its own, each forward draws a step seed from ``seed``.
    """

    def __init__(self, layer: Layer, tracker: Optional[MemoryUsageTracker] = None, *,
                 seed: Union[None, int, np.random.Generator] = None) -> None:
        self.inner = _check_layer(layer, "the wrapped layer")
        if isinstance(layer, CheckpointedLayer):
            raise TypeError("a CheckpointedLayer cannot wrap another CheckpointedLayer")
        self.memory_tracker = _check_tracker(tracker)
        self._rng = _as_generator(seed)
        self._stored: Optional[np.ndarray] = None
        self._step: Optional[Step] = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The inner layer's output; in training mode the input is kept for backward.

        In evaluation mode nothing is kept, and an input kept by an earlier training forward
        stays for its backward.
        """
        return self.forward_step(x, new_step(self._rng, [self.inner]))

    def forward_step(self, x: np.ndarray, step: Step) -> np.ndarray:
        y = self.inner.forward_step(x, step)
        if not self.is_training:
            return y
        self._drop_stored()
        self._stored, self._step = x, step
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
        recomputed = self.inner.forward_step(stored, self._step)
        grad_input = self.inner.backward_step(stored, grad_output, self._step,
                                              output=recomputed)
        self.memory_tracker.record_recomputed(recomputed.nbytes)
        self._drop_stored()
        return grad_input

    def backward_step(self, x: np.ndarray, grad_output: np.ndarray, step: Step, *,
                      output: Optional[np.ndarray] = None) -> np.ndarray:
        return self.backward(x, grad_output)

    def _drop_stored(self) -> None:
        if self._stored is not None:
            self.memory_tracker.release_stored_activation(self._stored.nbytes)
            self._stored = None

    @property
    def has_stored_input(self) -> bool:
        return self._stored is not None

    def children(self) -> list:
        return [self.inner]

    def describe(self, in_width: Optional[int] = None):
        return self.inner.describe(in_width)

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
    def preserves_width(self) -> bool:
        return self.inner.preserves_width

    @property
    def layer_type(self) -> str:
        return "CheckpointedLayer"

    @property
    def layer_description(self) -> str:
        return f"CheckpointedLayer({self.inner.layer_description})"

    def __getattr__(self, name: str):
        # Shape facts (in_features, out_features, dtype) come from the inner layer.
        if name in ("in_features", "out_features", "dtype"):
            return getattr(self.__dict__["inner"], name)
        raise AttributeError(name)


class SegmentCheckpointer:
    """Runs a chain of layers keeping only some activations, recomputing the rest in backward.

    ``checkpoint_every=k`` keeps the inputs of elements 0, k, 2k, ...: k=1 is plain backprop
    (every activation kept, the internals of Residual blocks included; nothing recomputed),
    k=0 keeps only the network input; the default is floor(sqrt(N)) for N elements (a Residual
    block is one element), which brings activation memory from O(N) to O(sqrt(N)) for about
    one extra forward pass. Instead of k, give a ``plan`` from :func:`ckpt.plan.plan` (its peak
    counts activations and scratch; the two gradient buffers, :meth:`gradient_workspace_bytes`,
    come on top), or ``budget_bytes`` (an int or a string such as "4MiB"): the least
    recomputation whose activations *and* gradient buffers fit, planned for each batch size.

    A chain of ckpt's own layers (Dense, LayerNorm, Dropout, Residual) of one dtype runs in the
    compiled executor (``executor == "compiled"``): one compiled call for the forward pass and
    one for the whole backward pass, GIL released, workspaces reused across steps. Any other
    chain runs the same schedule through the layers' Python methods (``"python"``).

    ``seed`` seeds the Generator that draws each training step's seed, which keys the Dropout
    masks: a run is reproducible, and every recomputation replays the forward's masks.

    ``forward`` returns a read-only array (it is kept for backward); ``backward`` accumulates
    the parameter gradients and returns the gradient of the input, then releases every stored
    activation. In steady state a step allocates three arrays and nothing else: the arena of
    stored activations and scratch (one block, freed when backward ends -- that is what lets
    checkpointing give memory back), the output and the input gradient (both handed to the
    caller). The two gradient buffers and the compiled schedule are kept across steps.

    Kept inputs are referenced, not copied: do not modify the input in place between forward
    and backward (backward would recompute from the changed values). ``check_inputs=True`` is a
    debug mode that detects it: forward takes a checksum of the input, backward raises
    CheckpointStateError if it changed (it costs a pass over the input twice a step).

    Threads: a step begun by one thread belongs to it until its backward; a forward or backward
    from another thread meanwhile raises CheckpointStateError. Separate checkpointers run in
    parallel threads freely.

    Cores inside a step (compiled executor; see :mod:`ckpt.threads`): ``threads_mode`` is
    "tuned" (OpenBLAS at the thread count, 1 .. T = ckpt.get_num_threads(), measured fastest on
    the first training steps of each batch size, among those that compute the bits of T
    threads: :mod:`ckpt.tuning`, :attr:`threads_tuning`), "auto" (tuned with the batch split
    among the candidates: results may differ in the last bits between runs that choose
    differently), "split" (the batch split into T contiguous slices, one per thread of ckpt's
    pool, single-threaded BLAS; gradients reduced in the fixed order ((g + slice 0) + slice 1)
    + ...) or "blas" (OpenBLAS's T threads in each GEMM); None (the default) follows
    :func:`ckpt.threading_mode`, itself "tuned" by default. The thread count a tuned step sets
    is process-wide (this OpenBLAS has no per-thread setting; see :mod:`ckpt.threads`). A split
    step shares the budget as follows: the arena is the unsplit one, split by rows; the
    gradient buffers likewise; the T - 1 gradient copies come on top and count as gradient
    bytes (:meth:`gradient_workspace_bytes`, the tracker).
    """

    def __init__(self, layers: Iterable[Layer] = (), checkpoint_every: Optional[int] = None, *,
                 tracker: Optional[MemoryUsageTracker] = None, plan=None,
                 budget_bytes: Optional[int] = None,
                 seed: Union[None, int, np.random.Generator] = None,
                 check_inputs: bool = False, threads_mode: Optional[str] = None) -> None:
        if layers is None or isinstance(layers, (Layer, str, bytes)) \
                or not isinstance(layers, Iterable):
            raise TypeError(f"layers must be a list of ckpt Layers, got {type(layers).__name__}")
        self._policy = SchedulePolicy(checkpoint_every, plan, budget_bytes)
        self.memory_tracker = _check_tracker(tracker)
        if not isinstance(check_inputs, (bool, np.bool_)):
            raise TypeError(f"check_inputs must be a bool, got {type(check_inputs).__name__}")
        self.check_inputs = bool(check_inputs)
        self._threads_mode = None if threads_mode is None else check_mode(threads_mode)
        self._tuner = ThreadsTuner()
        self._input_checksum: Optional[int] = None
        self._rng = _as_generator(seed)
        self._lock = threading.Lock()
        self._owner: Optional[int] = None   # the thread whose step is pending
        self._layers: List[Layer] = []
        self._invalidate()
        for layer in layers:
            self._append(layer)
        if plan is not None:
            self._check_plan(plan)
        self._training = True
        self._state = None      # the pending step (a runner's CompiledStep or PythonStep)

    # ---------------------------------------------------------------- the chain
    def _invalidate(self) -> None:
        self._costs: object = _UNKNOWN
        self._runner_cache = _UNKNOWN
        self._streams = _UNKNOWN
        self._policy.invalidate()
        if hasattr(self, "_tuner"):
            self._tuner.clear()

    def _append(self, layer: Layer) -> None:
        index = len(self._layers)
        _check_layer(layer, f"layer {index}")
        inside = {id(other) for other in walk(self._layers)}
        if any(id(part) in inside for part in walk([layer])):
            raise ValueError(f"layer {index} ({layer.layer_description}) is already in the chain")
        if self._layers:
            prev = self._layers[-1]
            produced = getattr(prev, "out_features", None)
            expected = getattr(layer, "in_features", None)
            if produced is not None and expected is not None and produced != expected:
                raise ValueError(f"layer {index - 1} ({prev.layer_description}) produces "
                                 f"{produced} features but layer {index} "
                                 f"({layer.layer_description}) expects {expected}")
            dt_prev, dt = self.dtype, _declared_dtype([layer])
            if dt_prev is not None and dt is not None and dt_prev != dt:
                raise TypeError(f"the chain is {dt_prev} but layer {index} is {dt}")
        self._layers.append(layer)
        self._invalidate()

    def push(self, layer: Layer) -> None:
        """Append a layer at the end of the chain."""
        with self._lock:
            self._check_owner()
            if self._state is not None:
                raise CheckpointStateError("cannot add a layer between forward and backward")
            if self._policy.plan is not None:
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
        return self._policy.checkpoint_every(len(self._layers))

    @property
    def plan(self):
        return self._policy.plan

    @property
    def budget_bytes(self) -> Optional[int]:
        return self._policy.budget

    @property
    def costs(self) -> Optional[ChainCosts]:
        """The elements' descriptions (ckpt.costs), or None when a layer cannot describe itself."""
        if self._costs is _UNKNOWN:
            self._costs = describe_chain(self._layers) if self._layers else None
        return self._costs

    @property
    def widths(self) -> Optional[tuple]:
        """Activation widths a_0 ... a_N, when every layer can describe itself."""
        costs = self.costs
        return None if costs is None else costs.widths

    @property
    def dtype(self) -> Optional[np.dtype]:
        return _declared_dtype(self._layers)

    @property
    def executor(self) -> str:
        """"compiled" when the chain runs in the compiled executor, else "python"."""
        return self._runner().name

    def _check_plan(self, plan) -> None:
        if not (hasattr(plan, "widths") and hasattr(plan, "ops")):
            raise TypeError(f"plan must be a ckpt.plan.Plan (from ckpt.plan.plan), "
                            f"got {type(plan).__name__}")
        widths = self.widths
        if widths is None or tuple(plan.widths) != widths:
            raise ValueError(f"the plan is for widths {tuple(plan.widths)}, "
                             f"but the layers have widths {widths}")
        plan_costs = getattr(plan, "costs", None)
        if isinstance(plan_costs, ChainCosts) and _memory(plan_costs) != _memory(self.costs):
            raise ValueError("the plan was made for elements that store or need other amounts "
                             "of memory than these layers (plan from the layers themselves)")

    def _dropout_streams(self) -> dict:
        """Stream ids of the chain's Dropout layers (ckpt.elements.dropout_streams), cached."""
        if self._streams is _UNKNOWN:
            self._streams = dropout_streams(self._layers)
        return self._streams

    def _runner(self):
        """The runner of this chain's steps, built once: the compiled executor when it can run
        the chain (ckpt's own kinds, one dtype), else the layers' Python methods."""
        if self._runner_cache is _UNKNOWN:
            costs, chain = self.costs, None
            if costs is not None and self.dtype is not None:
                chain = build_chain(self._layers, costs)
            self._runner_cache = (CompiledRunner(chain, costs) if chain is not None
                                  else PythonRunner(self._layers, costs, self.dtype))
        return self._runner_cache

    def _typed_chain(self):
        """The compiled executor of the chain (None for the Python path)."""
        runner = self._runner()
        return runner.chain if isinstance(runner, CompiledRunner) else None

    @property
    def threads_mode(self) -> Optional[str]:
        """The mode this checkpointer fixes (one of ckpt.threads.MODES), or None: the context's."""
        return self._threads_mode

    @property
    def threads_tuning(self) -> ThreadsTuner:
        """The measurements of the "tuned" and "auto" modes: ``threads_tuning.report()`` gives,
        per batch size, the chosen configuration and the seconds of each candidate."""
        return self._tuner

    def _tuned_mode(self) -> Optional[str]:
        """"tuned" or "auto" when this chain's steps are measured, else None (a fixed mode,
        or the Python path, which runs OpenBLAS at T threads)."""
        mode = self._threads_mode or get_threading_mode()
        return None if mode in FIXED_MODES or self._typed_chain() is None else mode

    def slices(self, batch_size: int) -> int:
        """Batch slices a step of this batch size runs in now (1: not split), from the mode
        and T = ckpt.get_num_threads() (for "tuned" and "auto": the configuration measured or
        being measured); the Python path never splits."""
        if self._typed_chain() is None:
            return 1
        mode = self._threads_mode or get_threading_mode()
        if mode in FIXED_MODES:
            return choose_slices(mode, requested_num_threads(), batch_size)
        return self._tuner.config(batch_size, requested_num_threads(), mode).slices

    def _fits(self, batch_size: int, config: Config) -> bool:
        """Whether a configuration's schedule fits the budget (always, without one)."""
        if self._policy.budget is None:
            return True
        try:
            self._policy.compiled(self.costs, batch_size, config.slices, self.dtype, True,
                                  lambda: self.gradient_workspace_bytes(batch_size,
                                                                        config.slices))
        except ValueError:
            return False
        return True

    def schedule(self, batch_size: int) -> CompiledSchedule:
        """The compiled schedule used for a batch size (budgets are planned per batch size and
        number of batch slices, whose gradient copies come out of the budget)."""
        batch_size = _check_batch_size(batch_size)
        if self._policy.budget is not None and (self.costs is None or self.dtype is None):
            raise ValueError("budget_bytes needs layers that describe their costs and a dtype "
                             "(ckpt's own layers do)")
        costs = self.costs if self.costs is not None else _unknown_costs(len(self._layers))
        slices = self.slices(batch_size)
        return self._policy.compiled(costs, batch_size, slices, self.dtype,
                                     isinstance(self._runner(), CompiledRunner),
                                     lambda: self.gradient_workspace_bytes(batch_size, slices))

    def _plan_for_budget(self, batch_size: int):
        """The least-recomputation plan whose activations and gradient buffers fit the budget."""
        return self._policy._plan_for_budget(self.costs, batch_size, self.dtype,
                                             self.gradient_workspace_bytes(batch_size))

    def gradient_workspace_bytes(self, batch_size: int, slices: Optional[int] = None) -> int:
        """Bytes of the gradient workspace the compiled executor holds in backward (outside a
        plan's peak): the two gradient buffers, plus the parameter-gradient copies of batch
        slices 1 .. slices - 1 when the step is split (``slices``: default, what
        :meth:`slices` chooses now)."""
        batch_size = _check_batch_size(batch_size)
        if slices is None:
            slices = self.slices(batch_size)
        return self.costs.gradient_workspace_bytes(batch_size, slices, self.dtype.itemsize)

    # ---------------------------------------------------------------- training
    def _check_owner(self) -> None:
        if self._state is not None and self._owner != threading.get_ident():
            raise CheckpointStateError(
                "another thread's step is pending on this checkpointer (its forward ran, its "
                "backward has not): a step belongs to the thread that began it")

    def next_step_seed(self) -> int:
        """Draw the next step seed from the checkpointer's Generator (``seed=``)."""
        return int(self._rng.integers(0, 2**64, dtype=np.uint64))

    def forward(self, x: np.ndarray, *, row_offset: int = 0,
                step_seed: Optional[int] = None) -> np.ndarray:
        """Run the chain; in training mode keep what the schedule stores for backward.

        A training forward keys its Dropout masks on a step seed, drawn from the checkpointer's
        Generator unless ``step_seed`` is given, and on the global row: ``row_offset`` is the
        index of x's first row within the step's batch. Forwards of the slices of one batch
        (micro-batches, threads, MPI ranks) given one step_seed and their offsets see the masks
        of the whole batch; ``fit`` does this.
        """
        # The kernels index rows as int64 row_offset + r, r below the 32-bit BLAS limit: the
        # bound keeps every global row index in range (an OverflowError before).
        if isinstance(row_offset, bool) or not isinstance(row_offset, numbers.Integral) \
                or not 0 <= row_offset <= 2**63 - 2**31:
            raise ValueError(f"row_offset must be an integer in [0, 2**63 - 2**31], "
                             f"got {row_offset!r}")
        if step_seed is not None and (isinstance(step_seed, bool)
                                      or not isinstance(step_seed, numbers.Integral)
                                      or not 0 <= step_seed < 2**64):
            raise ValueError(f"step_seed must be an integer in [0, 2**64), got {step_seed!r}")
        with self._lock:
            self._check_owner()
            return self._forward(x, int(row_offset), step_seed)

    def _forward(self, x: np.ndarray, row_offset: int, step_seed: Optional[int]) -> np.ndarray:
        if not self._layers:
            return x
        runner = self._runner()
        width, dtype = (self.widths[0] if self.widths else None), self.dtype
        if width is not None and dtype is not None:
            x = as_batch(x, width, dtype, "the input", "SegmentCheckpointer")
        elif not isinstance(x, np.ndarray) or x.ndim < 1:
            raise TypeError(f"SegmentCheckpointer: the input must be a numpy array with a batch "
                            f"dimension, got {type(x).__name__}")
        schedule = self.schedule(x.shape[0])
        streams = self._dropout_streams()
        # A fresh seed keys each training step's Dropout masks (none needed without Dropout).
        if not (streams and self._training):
            seed = 0
        else:
            seed = int(step_seed) if step_seed is not None else self.next_step_seed()
        mode = self._tuned_mode()
        if mode is not None:
            config = self._tuner.begin(x.shape[0], requested_num_threads(), mode, self._training,
                                       row_offset, lambda c: self._fits(x.shape[0], c))
            pending, seconds = timed(config, lambda: runner.forward(
                x, schedule, seed, row_offset, self._training, config.slices,
                self.memory_tracker, self._release_pending))
            self._tuner.add_seconds(seconds)
        elif isinstance(runner, CompiledRunner):
            pending = runner.forward(x, schedule, seed, row_offset, self._training,
                                     self.slices(x.shape[0]), self.memory_tracker,
                                     self._release_pending)
        else:
            pending = runner.forward(x, schedule, Step(seed, row_offset, streams),
                                     self.memory_tracker, self._release_pending)
        y = pending.output
        y.flags.writeable = False
        self._state = pending
        self._owner = threading.get_ident()
        if self.check_inputs:
            self._input_checksum = _checksum(x)
        if not self._training:
            self._release()
        return y

    def backward(self, grad_output: np.ndarray, *, input_grad: bool = True,
                 accumulate: bool = True) -> Optional[np.ndarray]:
        """Back-propagate from the gradient of the output; returns the gradient of the input.

        With ``input_grad=False`` the compiled executor skips the first element's input
        gradient (training rarely needs it) and None is returned.

        The parameter gradients are added to what they hold (``accumulate=True``, as in
        PyTorch), or set to this backward's (``accumulate=False``: the values ``zero_grad()``
        followed by a backward gives, without a pass over the gradients to zero them; the
        compiled executor writes them directly). A training step is then forward,
        ``backward(g, accumulate=False)``, ``update(lr)``.

        An exception during the backward (Ctrl-C included: the compiled phase polls for it
        between rows) drops the step, but the gradients keep what was accumulated before it:
        zero them before the next step, as ``fit`` does.
        """
        if not isinstance(accumulate, (bool, np.bool_)):
            raise TypeError(f"accumulate must be True or False, got {type(accumulate).__name__}")
        with self._lock:
            self._check_owner()
            return self._backward(grad_output, input_grad, bool(accumulate))

    def _backward(self, grad_output: np.ndarray, input_grad: bool,
                  accumulate: bool) -> Optional[np.ndarray]:
        if not self._layers:
            return grad_output if input_grad else None
        pending = self._state
        if pending is None:
            raise CheckpointStateError(
                "backward needs a forward first: nothing is stored (backward before forward, "
                "a second backward, or a forward in evaluation mode)")
        if self.check_inputs and _checksum(pending.input) != self._input_checksum:
            raise CheckpointStateError(
                "the input was modified in place between forward and backward: the "
                "recomputation would use the new values (check_inputs=True caught it)")
        runner = self._runner()
        grad_output = runner.check_grad_output(pending, grad_output)  # before the step is used
        self._state = None
        tuner = self._tuner
        config = tuner.pending_config() if self._tuned_mode() is not None else None
        if config is None:
            return runner.backward(pending, grad_output, input_grad, accumulate,
                                   self.memory_tracker)
        verifying = tuner.needs_verification()
        grad_input, seconds = timed(config, lambda: runner.backward(
            pending, grad_output, input_grad, accumulate, self.memory_tracker))
        if verifying:
            self._verify(runner, pending, grad_output, grad_input, input_grad, accumulate)
        else:
            tuner.add_seconds(seconds)
        tuner.finish()
        return grad_input

    def _verify(self, runner, pending, grad_output, grad_input, input_grad,
                accumulate) -> None:
        """Rerun the step just done in each candidate configuration (ckpt.tuning), setting
        the gradients: the tuner keeps the candidates that give the reference's bits. One
        rerun's activations are alive at a time (the step's own are dropped first); after a
        step that accumulated, its gradients are copied once and put back."""
        grads = self.gradients()
        accumulated = [g.copy() for g in grads] if accumulate else None
        step = self._tuner.pending
        pending.arena = None        # the step is done: its activations are not needed

        def rerun(config: Config) -> tuple:
            scratch = MemoryUsageTracker()
            with blas_threads(config.threads):
                again = runner.forward(pending.x, pending.schedule, pending.seed,
                                       step.row_offset, step.training, config.slices, scratch,
                                       lambda: None)
                gi = runner.backward(again, grad_output, input_grad, False, scratch)
            return (again.y, gi, *grads)

        try:
            self._tuner.verify(rerun, None if accumulate else (pending.y, grad_input, *grads))
        finally:
            if accumulated is not None:
                for g, value in zip(grads, accumulated):
                    np.copyto(g, value)

    def discard(self) -> None:
        """Drop what a pending forward stored, without back-propagating (no-op if none).

        Afterwards the checkpointer is as before that forward, and backward is refused until
        the next forward.
        """
        with self._lock:
            self._check_owner()
            if self._state is not None:
                self._release()

    def _release_pending(self) -> None:
        if self._state is not None:
            self._release()

    def _release(self) -> None:
        """Drop what a forward stored without back-propagating (tracker included)."""
        pending, self._state = self._state, None
        self._runner().release(pending, self.memory_tracker)

    def _held_after_forward(self, batch: int) -> int:
        """Elements the forward phase leaves held (a_0 and a_N included)."""
        return self.schedule(batch).trace.held_after_forward_units * batch

    def zero_grad(self) -> None:
        """Set every parameter gradient to zero."""
        self._runner().zero_grad()

    def update(self, learning_rate: float) -> None:
        """One plain SGD step on every layer (one compiled call for a compiled chain)."""
        lr = _check_learning_rate(learning_rate)
        with self._lock:
            self._check_owner()
            if self._state is not None:
                # Backward would recompute with the new weights: wrong gradients, silently.
                raise CheckpointStateError("update between forward and backward would make "
                                           "backward recompute with changed weights; call "
                                           "backward first")
            self._runner().sgd_update(lr)

    def params(self) -> list:
        return [p for layer in self._layers for p in layer.params()]

    def gradients(self) -> list:
        return [g for layer in self._layers for g in layer.gradients()]

    def set_training(self, training: bool) -> None:
        """In evaluation mode forward stores nothing (and a backward after it is refused), and
        Dropout is the identity.

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
        return (f"SegmentCheckpointer({len(self._layers)} layers, "
                f"{self._policy.describe(len(self._layers))}, "
                f"parameters={self.parameter_count})")

    # ---------------------------------------------------------------- pickling
    # Transient attributes, rebuilt lazily after pickle, copy or deepcopy:
    #   _costs, _streams  the elements' descriptions and Dropout stream ids (from the layers)
    #   _runner_cache     the runner (the compiled one holds C pointers into the layers' arrays
    #                     and the gradient workspace)
    #   _state, _owner    a pending forward (what it stored for backward) and its thread
    #   _input_checksum   check_inputs' checksum of the pending forward's input
    #   _lock             the lock of this instance
    # The policy pickles its settings, not its compiled schedules.
    _TRANSIENT = ("_costs", "_streams", "_runner_cache", "_state", "_owner", "_input_checksum",
                  "_lock")

    def __getstate__(self) -> dict:
        """The layers, schedule policy, seed generator, tracker and mode; a pending forward
        is dropped.

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
        self._invalidate()
        self._lock = threading.Lock()
        self._owner = None
        self._input_checksum = None
        self._state = None
        if pending:
            self.memory_tracker.release_stored_activation(pending)

    def _pending_bytes(self) -> int:
        """Bytes the tracker counts for a pending forward (0 when there is none)."""
        if self._state is None:
            return 0
        return self._runner().pending_bytes(self._state)


_UNKNOWN = object()   # a cached value not computed yet


def _memory(costs: ChainCosts) -> list:
    """What a plan's validity depends on: each element's widths, stored size, tape, scratch."""
    return [(e.in_width, e.out_width, e.stored, e.tape, e.forward_scratch, e.backward_scratch)
            for e in costs.elements]


def _checksum(x: np.ndarray) -> int:
    """CRC-32 of an array's bytes (check_inputs' guard against in-place edits)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B"))


def _declared_dtype(layers: Sequence[Layer]) -> Optional[np.dtype]:
    """The dtype of the first layer (blocks' insides included) that declares one."""
    for layer in walk(layers):
        dt = getattr(layer, "dtype", None)
        if dt is not None:
            return np.dtype(dt)
    return None


def _unknown_costs(n: int) -> ChainCosts:
    """Placeholder descriptions for a chain whose layers cannot describe themselves: the
    schedule is still checked, its sizes mean nothing."""
    return ChainCosts(tuple(ElementCost("unknown", 1, 1, stored=0, forward_flops=0,
                                        backward_flops=0) for _ in range(n)))


def _check_batch_size(batch_size: object) -> int:
    """A batch size: a non-negative integer (an empty batch is legitimate), or a clear error."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be a non-negative integer, got "
                        f"{type(batch_size).__name__} {batch_size!r}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative integer, got {batch_size}")
    return int(batch_size)
