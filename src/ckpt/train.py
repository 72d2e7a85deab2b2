"""Training loops: build an MLP and fit it on in-memory arrays (predict and evaluate, from
:mod:`ckpt.inference`, are importable from here too).

A model here is a SegmentCheckpointer, or any object with ``forward(x)``, ``backward(grad)``,
``params()`` and ``gradients()``; a plain list of layers is wrapped in a SegmentCheckpointer.
Data flows one way: fit -> loss and optimizer -> the model's forward and backward.
"""
from __future__ import annotations

import inspect
import numbers
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ckpt.activations import get_activation
from ckpt.costs import ChainCosts
from ckpt.elements import Activation, BatchNorm
from ckpt.elements.activation import activation_cost
from ckpt.elements.batchnorm import batchnorm_cost
from ckpt.elements.dense import dense_cost
from ckpt.elements.dropout import dropout_cost
from ckpt.elements.layernorm import layernorm_cost
from ckpt.elements.residual import residual_cost
from ckpt.distributed import DataParallel, shard_batches
# predict, evaluate and evaluation_mode live below train and distributed; importable from here.
from ckpt.inference import (as_model, check_inputs, count_correct, evaluate,  # noqa: F401
                            evaluation_mode, model_dtype, predict)
from ckpt.layers import (Dense, Dropout, DTypeLike, Layer, LayerNorm, Residual, _as_generator,
                         check_allocation, check_blas_size, check_float_dtype, check_size,
                         walk)
from ckpt.losses import get_loss
from ckpt.optim import Adam, Optimizer
from ckpt.resume import RunState

History = Dict[str, List[float]]


def build_mlp(n_in: int, depth: int, width: int, n_out: int, activation: Optional[str] = "relu",
              dtype: DTypeLike = np.float32,
              seed: Union[None, int, np.random.Generator] = None, *, residual: bool = False,
              norm: Optional[str] = None, dropout: float = 0.0) -> List[Layer]:
    """An MLP as a list of layers, ready for a SegmentCheckpointer.

    Plain (``residual=False``): ``depth`` Dense layers n_in -> width -> ... -> width -> n_out,
    the hidden ones with ``activation``, the last one linear (logits or regression values);
    depth=1 is a single linear layer. ``norm="layer"`` adds a LayerNorm after each hidden
    layer; ``norm="batch"`` makes each hidden layer Dense -> BatchNorm -> Activation (the Dense
    linear, its activation after the normalisation). ``dropout`` adds a Dropout after each
    hidden layer (and its norm).

    Residual (``residual=True``), a pre-norm residual MLP: an input projection Dense(n_in ->
    width), then ``depth`` blocks x + f(x), then a norm and the output layer Dense(width ->
    n_out). With LayerNorm (``norm`` None or "layer"), f = [LayerNorm -> Dense(width -> width,
    activation) -> Dropout(dropout) -> Dense(width -> width)] and the head is LayerNorm ->
    Dense. With ``norm="batch"``, the ResNet of "Revisiting Deep Learning Models for Tabular
    Data" (Gorishniy et al., 2021): f = [BatchNorm -> Dense(activation) -> Dropout -> Dense ->
    Dropout] and the head BatchNorm -> Activation -> Dense. (No Dropout when dropout is 0.)
    The last Dense of every branch starts with its weights scaled by 1 / depth, so each block
    starts close to the identity and the ``depth`` branches together change the skip path by
    O(1) at first: deep stacks (128 blocks) train as shallow ones do.

    ``norm="layernorm"`` is accepted for "layer".
    """
    depth = check_size(depth, "depth")
    _check_mlp_memory(n_in, depth, width, n_out, dtype, residual)
    rng = _as_generator(seed)
    norm = check_norm(norm)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not isinstance(residual, (bool, np.bool_)):
        raise TypeError(f"residual must be True or False, got {residual!r}")
    if residual:
        return _residual_mlp(n_in, depth, width, n_out, activation, dtype, rng, dropout,
                             norm or "layer")
    sizes = [n_in] + [width] * (depth - 1) + [n_out]
    layers: List[Layer] = []
    for i in range(depth):
        hidden = i < depth - 1
        if hidden and norm == "batch" and activation is not None:
            layers += [Dense(sizes[i], sizes[i + 1], None, dtype=dtype, rng=rng),
                       BatchNorm(sizes[i + 1], dtype=dtype), Activation(activation)]
        else:
            layers.append(Dense(sizes[i], sizes[i + 1], activation if hidden else None,
                                dtype=dtype, rng=rng))
            if hidden and norm is not None:
                layers.append(_norm_layer(norm, sizes[i + 1], dtype))
        if hidden and dropout > 0:
            layers.append(Dropout(dropout))
    return layers


NORMS = ("layer", "batch")


def check_norm(norm: object) -> Optional[str]:
    """None, "layer" or "batch" ("layernorm" is "layer"); ValueError for anything else."""
    if norm == "layernorm":
        return "layer"
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm must be None, 'layer' or 'batch' ('layernorm' is 'layer'), "
                         f"got {norm!r}")
    return norm


def _norm_layer(norm: str, width: int, dtype: DTypeLike) -> Layer:
    return LayerNorm(width, dtype=dtype) if norm == "layer" else BatchNorm(width, dtype=dtype)


def _check_mlp_memory(n_in: object, depth: int, width: object, n_out: object, dtype: DTypeLike,
                      residual: bool) -> None:
    """Check the sizes, and that the weights and their gradients fit in memory, before building
    any layer: a huge depth must not build layer after layer until memory runs out."""
    n_in = check_blas_size(n_in, "n_in")
    width = check_blas_size(width, "width")
    n_out = check_blas_size(n_out, "n_out")
    itemsize = check_float_dtype(dtype).itemsize
    if residual:
        weights = n_in * width + 2 * depth * width * width + width * n_out
    elif depth == 1:
        weights = n_in * n_out
    else:
        weights = n_in * width + (depth - 2) * width * width + width * n_out
    # Each block also costs Python objects: about 1 KiB a layer, 5 KiB a residual block
    # (measured with tracemalloc); 8 KiB a block bounds both, with norm and dropout.
    check_allocation(2 * weights * itemsize + 8192 * depth,
                     f"build_mlp(n_in={n_in}, depth={depth}, width={width}, n_out={n_out}, "
                     f"{np.dtype(dtype).name}) layers")


def _residual_mlp(n_in: int, depth: int, width: int, n_out: int, activation: Optional[str],
                  dtype: DTypeLike, rng: np.random.Generator, dropout: float,
                  norm: str) -> List[Layer]:
    scale = 1.0 / depth
    layers: List[Layer] = [Dense(n_in, width, None, dtype=dtype, rng=rng)]
    for _ in range(depth):
        branch: List[Layer] = [_norm_layer(norm, width, dtype),
                               Dense(width, width, activation, dtype=dtype, rng=rng)]
        if dropout > 0:
            branch.append(Dropout(dropout))
        last = Dense(width, width, None, dtype=dtype, rng=rng)
        last.W *= scale
        branch.append(last)
        if norm == "batch" and dropout > 0:
            branch.append(Dropout(dropout))
        layers.append(Residual(*branch))
    layers.append(_norm_layer(norm, width, dtype))
    if norm == "batch" and activation is not None:
        layers.append(Activation(activation))
    layers.append(Dense(width, n_out, None, dtype=dtype, rng=rng))
    return layers


def mlp_costs(n_in: int, depth: int, width: int, n_out: int, activation: Optional[str] = "relu",
              *, residual: bool = False, norm: Optional[str] = None,
              dropout: float = 0.0) -> ChainCosts:
    """The descriptions (ckpt.costs) of ``build_mlp``'s network with these arguments, without
    allocating it: what ``ckpt plan`` plans for. The tests check it against the layers'."""
    depth = check_size(depth, "depth")
    norm = check_norm(norm)
    preact = get_activation(activation).needs_preactivation

    def norm_cost(n):
        return layernorm_cost(n) if norm in (None, "layer") else batchnorm_cost(n)

    if residual:
        body = [norm_cost(width), dense_cost(width, width, needs_preactivation=preact,
                                             identity=activation is None)]
        body += [dropout_cost(width)] if dropout > 0 else []
        body.append(dense_cost(width, width, identity=True))
        body += [dropout_cost(width)] if dropout > 0 and norm == "batch" else []
        block = residual_cost(body)
        head = [norm_cost(width)]
        if norm == "batch" and activation is not None:
            head.append(activation_cost(width, needs_preactivation=preact))
        return ChainCosts((dense_cost(n_in, width, identity=True),) + (block,) * depth
                          + tuple(head) + (dense_cost(width, n_out, identity=True),))
    sizes = [n_in] + [width] * (depth - 1) + [n_out]
    elements = []
    for i in range(depth):
        hidden = i < depth - 1
        if hidden and norm == "batch" and activation is not None:
            elements += [dense_cost(sizes[i], sizes[i + 1], identity=True),
                         batchnorm_cost(sizes[i + 1]),
                         activation_cost(sizes[i + 1], needs_preactivation=preact)]
        else:
            elements.append(dense_cost(sizes[i], sizes[i + 1],
                                       needs_preactivation=preact and hidden,
                                       identity=not hidden or activation is None))
            if hidden and norm is not None:
                elements.append(norm_cost(sizes[i + 1]))
        if hidden and dropout > 0:
            elements.append(dropout_cost(sizes[i + 1]))
    return ChainCosts(tuple(elements))


def describe_architecture(layers: Sequence[Layer]) -> str:
    """A one-line name of a model's architecture, for summaries."""
    blocks = sum(isinstance(layer, Residual) for layer in layers)
    dense = sum(isinstance(layer, Dense) for layer in walk(layers))
    if blocks:
        drops = [layer.p for layer in walk(layers) if isinstance(layer, Dropout)]
        tail = f", dropout {drops[0]:g}" if drops else ""
        return f"pre-norm residual MLP, {blocks} blocks ({dense} Dense layers{tail})"
    return f"{dense} Dense layers"



def _check_batch_norm_rows(model: Any, n: int, batch_size: int, accumulation_steps: int,
                           ranks: int, synced: bool = False) -> None:
    """ValueError before the first step if a BatchNorm would see a training (micro-)batch of
    one row: every batch, micro-batch and rank's shard of the epoch is checked (the last batch
    of an epoch, n mod batch_size rows, is the one that usually has it). Synchronised, every
    rank must have rows in every step (each joins the step's allreduces)."""
    layers = getattr(model, "layers", None) or (model if isinstance(model, (list, tuple)) else [])
    if not any(isinstance(layer, BatchNorm) for layer in walk(layers)):
        return
    step = ranks * batch_size
    for rows in {min(step, n - start) for start in range(0, n, step)}:
        for rank in range(ranks):
            share = (rank + 1) * rows // ranks - rank * rows // ranks
            if share == 0 and not synced:
                continue    # a rank without rows this step runs no forward
            parts = max(1, min(accumulation_steps, share))
            if share // parts < 2:
                where = (f"rank {rank}'s share of a batch of {rows} rows has {share}"
                         if ranks > 1 else f"a batch of {rows} rows")
                raise ValueError(
                    f"BatchNorm needs at least 2 rows in every training (micro-)batch, but "
                    f"with {n} rows, batch_size {batch_size}, accumulation_steps "
                    f"{accumulation_steps}{f' and {ranks} ranks' if ranks > 1 else ''}, "
                    f"{where} split into {parts} micro-batch(es) of as few as "
                    f"{share // parts} row(s); change batch_size (the last batch of an epoch "
                    f"has n mod batch_size rows) or accumulation_steps")


def _model_widths(model: Any) -> Optional[Tuple[int, int]]:
    """(input features, outputs) when the model declares its widths."""
    widths = getattr(model, "widths", None)
    if isinstance(widths, tuple) and len(widths) >= 2:
        return widths[0], widths[-1]
    return None


def _check_optimizer(optimizer: object, model: Any) -> None:
    """TypeError/ValueError unless ``optimizer`` is a ckpt optimizer over the model's parameters."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a ckpt optimizer, got {type(optimizer).__name__}")
    mine = {id(p) for p in model.params()}
    foreign = sum(id(p) not in mine for p in optimizer.parameters)
    if foreign:
        raise ValueError(f"the optimizer updates {foreign} of its {len(optimizer.parameters)} "
                         f"parameters outside this model: build it on the model you fit "
                         f"(e.g. Adam(model))")



def fit(model: Any, X: np.ndarray, y: np.ndarray, *, loss: str = "cross_entropy",
        optimizer: Optional[Optimizer] = None, epochs: int = 10, batch_size: int = 32,
        seed: Union[None, int, np.random.Generator] = 0, accumulation_steps: int = 1,
        validation_data: Optional[Tuple[np.ndarray, np.ndarray]] = None,
        callback: Optional[Callable[[Dict[str, float]], Any]] = None,
        step_callback: Optional[Callable[[Dict[str, float]], Any]] = None,
        comm: Any = None, lr_schedule: Optional[Callable[[int, int], float]] = None,
        early_stopping: Optional[int] = None, run_state: Any = None,
        sync_batchnorm: bool = False) -> History:
    """Train ``model`` on (X, y) with mini-batch gradient descent; returns the history.

    - ``loss``: "cross_entropy" (y holds integer class labels; accuracy is reported) or "mse"
      (y holds targets, 1-D or (samples, outputs)).
    - ``optimizer``: any ckpt optimizer built on this model; default ``Adam(model)``.
    - ``seed``: an int or a numpy Generator; shuffles the samples every epoch.
    - ``accumulation_steps``: each batch is split into this many micro-batches whose gradients
      add up (weighted by their size) before one optimizer step, so the step equals the
      full-batch one while only a micro-batch of activations is alive at a time.
    - ``validation_data``: (X_val, y_val), evaluated after every epoch.
    - ``callback(metrics)`` after each epoch, with epoch, loss, accuracy, val_loss,
      val_accuracy (the last three when they apply) and seconds;
      ``step_callback(info)`` after each optimizer step, with epoch, step, steps, loss and
      accuracy (the running means of the epoch).

    - ``comm``: an mpi4py communicator: train data-parallel over its ranks (see
      :mod:`ckpt.distributed`). Call fit on every rank with the whole (X, y); ``batch_size`` is
      per rank, and K ranks train exactly as one process with batch K * batch_size would --
      except for BatchNorm, whose statistics are then each rank's own batch's (PyTorch DDP's
      default), with rank 0's running statistics copied to every rank after each step so the
      replicas never diverge.
    - ``sync_batchnorm``: with ``comm``, BatchNorm's statistics are those of the global batch
      (its forward and backward sums are allreduced), so K ranks x B rows train as one process
      with K * B; it needs ``accumulation_steps=1`` and at least two rows on every rank in
      every step.
    - ``lr_schedule``: a function (step, total_steps) -> learning rate, such as the schedules
      of :mod:`ckpt.optim.schedules`; the optimizer's ``lr`` is set from it before every
      optimizer step, counted from 0 over the ``epochs * steps per epoch`` of the run.
    - ``early_stopping``: a patience in epochs (needs ``validation_data``): training stops
      after that many epochs without a lower val_loss than the best so far, and the
      parameters of the best epoch (the first with the lowest val_loss) are restored; the
      history holds every epoch run. The optimizer's state stays that of the last epoch.
    - ``run_state``: a :class:`ckpt.resume.StateFolder`: a resumable state is written there at
      the end of every epoch (and every ``every_steps`` steps), and when it was opened to
      resume, training continues from its state (``epochs`` may be more than the state's) and
      ends with the bits an uninterrupted run would have, on the same threads.

    X is cast to the model's dtype once, up front (a memory map of that dtype stays one). The
    history maps each metric name to its list of per-epoch values.

    Threads need no argument: each step uses up to T = ckpt.get_num_threads() (by default the
    cores ckpt may use) in the model's threading mode ("tuned" unless set: the thread count
    measured fastest among those computing the same bits; see ckpt.threads and ckpt.tuning).
    """
    model = as_model(model)
    loss_fn = get_loss(loss)
    dtype = model_dtype(model)
    epochs = _check_count(epochs, "epochs", allow_zero=True)
    batch_size = check_size(batch_size, "batch_size")
    accumulation_steps = check_size(accumulation_steps, "accumulation_steps")
    if accumulation_steps > batch_size:
        raise ValueError(f"accumulation_steps ({accumulation_steps}) cannot exceed batch_size "
                         f"({batch_size}): each micro-batch needs at least one sample")
    for name, fn in (("callback", callback), ("step_callback", step_callback)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    widths = _model_widths(model)
    X, y = check_inputs(X, y, dtype, loss, widths=widths)
    if len(X) == 0:
        raise ValueError("cannot fit on an empty data set")
    if validation_data is not None:
        try:
            X_val, y_val = validation_data
        except (TypeError, ValueError):
            raise TypeError("validation_data must be a pair (X_val, y_val)") from None
        X_val, y_val = check_inputs(X_val, y_val, dtype, loss, name="X_val", widths=widths)
    if lr_schedule is not None and not callable(lr_schedule):
        raise TypeError(f"lr_schedule must be callable or None, got {type(lr_schedule).__name__}")
    if early_stopping is not None:
        early_stopping = _check_count(early_stopping, "early_stopping")
        if validation_data is None:
            raise ValueError("early_stopping needs validation_data to watch")
    if optimizer is not None:
        _check_optimizer(optimizer, model)
    if not isinstance(sync_batchnorm, (bool, np.bool_)):
        raise TypeError(f"sync_batchnorm must be True or False, got {sync_batchnorm!r}")
    if sync_batchnorm and comm is None:
        raise ValueError("sync_batchnorm needs data-parallel training over MPI: pass comm= "
                         "(an mpi4py communicator; ckpt train under mpiexec does)")
    if sync_batchnorm and accumulation_steps > 1:
        raise ValueError(f"sync_batchnorm synchronises whole batches: accumulation_steps must "
                         f"be 1, got {accumulation_steps}")
    _check_batch_norm_rows(model, len(X), batch_size, accumulation_steps,
                           comm.Get_size() if comm is not None else 1, bool(sync_batchnorm))
    resume = run_state.resume_from if run_state is not None else None
    if resume is not None:
        _check_resumable(resume, model, optimizer if optimizer is not None else Adam(model),
                         epochs)
    rng = _as_generator(seed)
    # Everything is checked: from here on the model, the optimizer and rng change.
    if optimizer is None:
        optimizer = Adam(model)
    replicas = None
    forward = _step_forward(model)
    sets_gradients = _backward_sets_gradients(model)
    next_seed = getattr(model, "next_step_seed", None)
    if callable(getattr(model, "set_training", None)):
        model.set_training(True)

    history: History = {}
    n = len(X)
    ranks = comm.Get_size() if comm is not None else 1
    total_steps = epochs * -(-n // (ranks * batch_size))
    done_steps = 0
    # Early stopping's best so far: val_loss, epoch, parameters, buffers (BatchNorm's).
    best: Optional[Tuple[float, int, List[np.ndarray], List[Dict[str, Any]]]] = None
    first_epoch, first_step, stopped = 1, 0, False
    resumed_order: Optional[np.ndarray] = None
    sums: Tuple[float, int, int] = (0.0, 0, 0)
    if resume is not None:
        # Before DataParallel: its broadcast then copies the restored state to every rank.
        history, best, done_steps, stopped = _restore(resume, model, optimizer, rng)
        first_epoch, first_step = resume.epoch + 1, resume.step
        if first_step:
            resumed_order, sums = np.asarray(resume.order), resume.sums
    if comm is not None:
        replicas = DataParallel(comm, model, optimizer, rng=rng, n_rows=len(X),
                                sync_batchnorm=bool(sync_batchnorm))
    step_rng = _step_seed_generator(model)

    def state(epoch_done: int, step: int, order: Optional[np.ndarray],
              epoch_sums: Tuple[float, int, int], stop: bool = False) -> RunState:
        return RunState(epoch_done, step, done_steps, [p.copy() for p in model.params()],
                        optimizer.state_dict(), rng.bit_generator.state,
                        step_rng.bit_generator.state if step_rng is not None else None,
                        order, epoch_sums, {key: list(v) for key, v in history.items()},
                        best[:2] if best is not None else None,
                        best[2] if best is not None else None, stop,
                        buffers=_get_buffers(model),
                        best_buffers=best[3] if best is not None else None)

    try:
        for epoch in range(first_epoch, epochs + 1):
            if stopped:
                break
            start = time.perf_counter()
            if resumed_order is not None:
                order, skip = resumed_order, first_step
                total_loss, correct, seen = sums
                resumed_order = None
            else:
                order, skip = rng.permutation(n), 0
                total_loss, correct, seen = 0.0, 0, 0
            batches = (replicas.shard(order, batch_size) if replicas is not None
                       else shard_batches(order, batch_size))
            steps = len(batches)
            for step, (batch, row_offset, global_rows) in enumerate(batches):
                if step < skip:
                    continue   # done before the state this run resumed from
                # The step's first backward sets the gradients when the model can (no pass to
                # zero them); otherwise they are zeroed here and every backward adds.
                fresh = sets_gradients
                if not fresh:
                    optimizer.zero_grad()
                # One seed per optimizer step keys its Dropout masks: micro-batches and ranks (even
                # one left without rows) share it, so the masks are the single full batch's.
                step_seed = next_seed() if next_seed is not None else None
                step_loss, step_correct = 0.0, 0
                for micro in np.array_split(batch, min(accumulation_steps, len(batch)) or 1):
                    if len(micro) == 0:
                        continue   # a data-parallel rank left without rows by a short last batch
                    xb, yb = X[micro], y[micro]
                    try:
                        output = forward(xb, row_offset, step_seed)
                        value, grad = loss_fn(output, yb)
                        if not np.isfinite(value):
                            raise ValueError(f"the loss is {value} at epoch {epoch}, batch {step + 1} "
                                             f"of {steps}: training diverged (lower the learning "
                                             f"rate?)")
                        step_correct += count_correct(output, yb, loss)
                        if len(micro) != len(batch):
                            # The loss gradient is a mean over the micro-batch; weigh it by its share.
                            grad *= len(micro) / len(batch)
                        if fresh:
                            model.backward(grad, accumulate=False)
                            fresh = False
                        else:
                            model.backward(grad)
                    except BaseException:
                        # A failed or interrupted step is dropped whole: no forward stays pending
                        # and no partial gradient is left for a later step() to apply.
                        _discard(model)
                        optimizer.zero_grad()
                        raise
                    step_loss += value * len(micro)
                    row_offset += len(micro)
                if fresh:
                    optimizer.zero_grad()   # no backward ran (a rank without rows): no gradient
                if replicas is not None:
                    step_loss, step_correct = replicas.allreduce_gradients(
                        len(batch), global_rows, step_loss, step_correct)
                if lr_schedule is not None:
                    optimizer.lr = _scheduled_rate(lr_schedule, done_steps, total_steps)
                _uninterrupted(optimizer.step)
                done_steps += 1
                total_loss += step_loss
                correct += step_correct
                seen += global_rows
                if run_state is not None and run_state.every_steps \
                        and done_steps % run_state.every_steps == 0 and step + 1 < steps:
                    run_state.write(state(epoch - 1, step + 1, order, (total_loss, correct, seen)))
                if step_callback is not None:
                    info = {"epoch": epoch, "step": step + 1, "steps": steps,
                            "loss": total_loss / seen}
                    if loss == "cross_entropy":
                        info["accuracy"] = correct / seen
                    step_callback(info)
            metrics = {"epoch": epoch, "loss": total_loss / n}
            if loss == "cross_entropy":
                metrics["accuracy"] = correct / n
            if validation_data is not None:
                val = evaluate(model, X_val, y_val, loss=loss, batch_size=max(batch_size, 256),
                               comm=comm)
                metrics.update({f"val_{key}": value for key, value in val.items()})
            metrics["seconds"] = time.perf_counter() - start
            for key, value in metrics.items():
                history.setdefault(key, []).append(value)
            if callback is not None:
                callback(metrics)
            if early_stopping is not None:
                if best is None or metrics["val_loss"] < best[0]:
                    best = (metrics["val_loss"], epoch, [p.copy() for p in model.params()],
                            _get_buffers(model))
                else:
                    stopped = epoch - best[1] >= early_stopping
            if run_state is not None:
                run_state.write(state(epoch, 0, None, (0.0, 0, 0), stopped))
    finally:
        if replicas is not None:
            replicas.release()
    if best is not None:
        for target, value in zip(model.params(), best[2]):
            np.copyto(target, value)
        _set_buffers(model, best[3])
    return history


def _buffered_layers(model: Any) -> List[Any]:
    """The model's layers that hold buffers (state that is not a parameter: BatchNorm's)."""
    layers = model if isinstance(model, (list, tuple)) else getattr(model, "layers", None)
    return [layer for layer in walk(layers or []) if callable(getattr(layer, "buffers", None))]


def _get_buffers(model: Any) -> List[Dict[str, Any]]:
    """A copy of every buffer, layer by layer: arrays copied, counts as they are."""
    return [{name: value.copy() if isinstance(value, np.ndarray) else value
             for name, value in layer.buffers().items()} for layer in _buffered_layers(model)]


def _set_buffers(model: Any, saved: List[Dict[str, Any]]) -> None:
    for layer, values in zip(_buffered_layers(model), saved):
        for name, value in values.items():
            current = getattr(layer, name)
            if isinstance(current, np.ndarray):
                np.copyto(current, value)
            else:
                setattr(layer, name, type(current)(value))


def _step_seed_generator(model: Any) -> Optional[np.random.Generator]:
    """The generator behind the model's next_step_seed (a SegmentCheckpointer's), if any."""
    rng = getattr(model, "_rng", None)
    return rng if isinstance(rng, np.random.Generator) else None


def _check_resumable(state: RunState, model: Any, optimizer: Optimizer, epochs: int) -> None:
    """ValueError unless ``state`` fits the model, the optimizer and ``epochs``."""
    params = model.params()
    shapes = [tuple(p.shape) for p in params]
    saved = [tuple(p.shape) for p in state.params]
    if saved != shapes:
        raise ValueError(f"the state's parameters have shapes {saved}, the model's {shapes}")
    optimizer.check_state_dict(state.optimizer)
    if state.epoch > epochs:
        raise ValueError(f"the state has {state.epoch} epochs done, more than epochs={epochs}")
    if state.step and state.order is None:
        raise ValueError("the state is within an epoch but holds no order of the rows")
    mine = _get_buffers(model)
    described = [{name: np.shape(value) for name, value in layer.items()} for layer in mine]
    saved_buffers = [{name: np.shape(value) for name, value in layer.items()}
                     for layer in state.buffers]
    if described != saved_buffers:
        raise ValueError(f"the state's buffers {saved_buffers} do not fit the model's "
                         f"{described}")


def _restore(state: RunState, model: Any, optimizer: Optimizer,
             rng: np.random.Generator) -> Tuple[History, Any, int, bool]:
    """Copy ``state`` into the model, optimizer and generators; returns (history, best,
    steps done, stopped) for fit's loop."""
    for target, value in zip(model.params(), state.params):
        np.copyto(target, value)
    optimizer.load_state_dict(state.optimizer)
    rng.bit_generator.state = state.rng_state
    step_rng = _step_seed_generator(model)
    if step_rng is not None and state.step_seed_state is not None:
        step_rng.bit_generator.state = state.step_seed_state
    _set_buffers(model, state.buffers)
    best = None
    if state.best is not None:
        best = (state.best[0], state.best[1], [np.array(p) for p in state.best_params],
                state.best_buffers or [])
    history = {key: list(values) for key, values in state.history.items()}
    return history, best, state.steps_done, state.stopped


def _scheduled_rate(schedule: Callable[[int, int], float], step: int, total: int) -> float:
    rate = schedule(step, total)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not rate > 0 \
            or not np.isfinite(rate):
        raise ValueError(f"lr_schedule({step}, {total}) gave {rate!r}; a learning rate must be "
                         f"a positive finite number")
    return float(rate)


def _step_forward(model: Any) -> Callable[[np.ndarray, int, Optional[int]], np.ndarray]:
    """forward(x, row_offset, step_seed): the model's forward, given the rows' position in the
    step's (global) batch and the step's seed -- which key per-row randomness (Dropout) --
    when it takes them (a SegmentCheckpointer does)."""
    try:
        takes = "row_offset" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    if takes:
        return lambda x, row_offset, seed: model.forward(x, row_offset=row_offset, step_seed=seed)
    return lambda x, row_offset, seed: model.forward(x)


def _backward_sets_gradients(model: Any) -> bool:
    """Whether the model's backward takes accumulate=False (a SegmentCheckpointer does)."""
    try:
        return "accumulate" in inspect.signature(model.backward).parameters
    except (TypeError, ValueError):
        return False


def _discard(model: Any) -> None:
    """Drop what a forward of the model left pending, when the model can."""
    discard = getattr(model, "discard", None)
    if callable(discard):
        discard()


def _uninterrupted(step: Callable[[], Any]) -> None:
    """Run ``step`` with Ctrl-C held back until it returns, so no update is half applied.

    Only the main thread receives SIGINT; elsewhere (or under a custom handler) step just runs.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        step()
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        step()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _check_count(value: object, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, "
                         f"got {value}")
    return int(value)
