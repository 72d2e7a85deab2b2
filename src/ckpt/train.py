"""Training loops: fit, predict and evaluate a model on in-memory arrays.

A model here is a SegmentCheckpointer, or any object with ``forward(x)``, ``backward(grad)``,
``params()`` and ``gradients()``; a plain list of layers is wrapped in a SegmentCheckpointer.
Data flows one way: fit -> loss and optimizer -> the model's forward and backward.
"""
from __future__ import annotations

import contextlib
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
from ckpt.distributed import shard_batches
from ckpt.layers import (Dense, Dropout, DTypeLike, Layer, LayerNorm, Residual, _as_generator,
                         check_allocation, check_blas_size, check_float_dtype, check_size,
                         walk)
from ckpt.losses import get_loss
from ckpt.optim import Adam, Optimizer

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


def as_model(model: Any):
    """The model itself, or a SegmentCheckpointer around a list of layers."""
    if isinstance(model, (list, tuple)):
        from ckpt.checkpoint import SegmentCheckpointer
        return SegmentCheckpointer(model)
    for name in ("forward", "backward", "params", "gradients"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"a model needs forward, backward, params and gradients; "
                            f"{type(model).__name__} has no {name}()")
    return model


def model_dtype(model: Any) -> np.dtype:
    """The dtype of the model's parameters."""
    for part in (model if isinstance(model, (list, tuple)) else [model]):
        if not callable(getattr(part, "params", None)):
            raise TypeError(f"model must be a layer, a SegmentCheckpointer or a list of layers, "
                            f"got {type(part).__name__}")
    params = model.params() if not isinstance(model, (list, tuple)) else \
        [p for layer in model for p in layer.params()]
    if not params:
        raise ValueError("the model has no parameters")
    return check_float_dtype(params[0].dtype)


def _check_inputs(X: object, y: object, dtype: np.dtype, loss: str, name: str = "X",
                  widths: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """X cast once to the model's dtype; y as int64 labels or float targets.

    ``widths`` (input features, outputs) are checked when the model declares them: X's width,
    the label range [0, outputs) or the targets' width. Every value of X and y must be finite
    in the model's dtype (a ValueError names the first bad row).
    """
    _refuse_masked(X, name)
    _refuse_masked(y, f"the targets of {name}")
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
    if widths is not None and X.shape[1] != widths[0]:
        raise ValueError(f"{name} has {X.shape[1]} features but the model expects {widths[0]}")
    with np.errstate(over="ignore"):   # overflow in the cast is reported below, by row
        X = np.ascontiguousarray(X, dtype=dtype)
    _check_finite(X, name, dtype)
    y = np.asarray(y)
    if y.shape[:1] != X.shape[:1]:
        raise ValueError(f"{name} has {X.shape[0]} rows but its targets have "
                         f"{y.shape[0] if y.ndim else 0}")
    if loss == "cross_entropy":
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy needs 1-D integer labels, got {y.dtype} {y.shape}")
        bad = np.flatnonzero((y < 0) | (y >= widths[1]) if widths is not None else y < 0)
        if len(bad):
            classes = f"the model's {widths[1]} classes [0, {widths[1]})" if widths is not None \
                else "the classes (labels start at 0)"
            raise ValueError(f"label {y[bad[0]]} in row {bad[0]} of the targets of {name} is "
                             f"outside {classes}")
        y = y.astype(np.int64, copy=False)
    else:
        if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
            raise TypeError(f"the targets of {name} must be real numbers, got dtype {y.dtype}")
        with np.errstate(over="ignore"):
            y = np.ascontiguousarray(y.reshape(len(y), -1), dtype=dtype)
        if widths is not None and y.shape[1] != widths[1]:
            raise ValueError(f"the targets of {name} have {y.shape[1]} columns but the model "
                             f"has {widths[1]} outputs")
        _check_finite(y, f"the targets of {name}", dtype)
    return X, y


def _refuse_masked(value: object, name: str) -> None:
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask ckpt would ignore; fill or drop "
                        f"the masked values first")


def _check_finite(values: np.ndarray, name: str, dtype: np.dtype) -> None:
    """ValueError naming the first row with a NaN or infinite value (after the cast to dtype)."""
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise ValueError(f"row {row} of {name} holds a NaN or infinite value (or one too large "
                         f"for {np.dtype(dtype).name})")


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


def _correct(output: np.ndarray, y: np.ndarray, loss: str) -> int:
    if loss != "cross_entropy":
        return 0
    return int(np.count_nonzero(output.argmax(axis=1) == y))


def fit(model: Any, X: np.ndarray, y: np.ndarray, *, loss: str = "cross_entropy",
        optimizer: Optional[Optimizer] = None, epochs: int = 10, batch_size: int = 32,
        seed: Union[None, int, np.random.Generator] = 0, accumulation_steps: int = 1,
        validation_data: Optional[Tuple[np.ndarray, np.ndarray]] = None,
        callback: Optional[Callable[[Dict[str, float]], Any]] = None,
        step_callback: Optional[Callable[[Dict[str, float]], Any]] = None,
        comm: Any = None) -> History:
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
      per rank, and K ranks train exactly as one process with batch K * batch_size would.

    X is cast to the model's dtype once, up front (a memory map of that dtype stays one). The
    history maps each metric name to its list of per-epoch values.

    Threads need no argument: each step uses T = ckpt.get_num_threads() (by default the cores
    ckpt may use) in the model's threading mode ("blas" unless set; see ckpt.threads).
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
    X, y = _check_inputs(X, y, dtype, loss, widths=widths)
    if len(X) == 0:
        raise ValueError("cannot fit on an empty data set")
    if validation_data is not None:
        try:
            X_val, y_val = validation_data
        except (TypeError, ValueError):
            raise TypeError("validation_data must be a pair (X_val, y_val)") from None
        X_val, y_val = _check_inputs(X_val, y_val, dtype, loss, name="X_val", widths=widths)
    if optimizer is not None:
        _check_optimizer(optimizer, model)
    rng = _as_generator(seed)
    # Everything is checked: from here on the model, the optimizer and rng change.
    if optimizer is None:
        optimizer = Adam(model)
    replicas = None
    if comm is not None:
        from ckpt.distributed import DataParallel
        replicas = DataParallel(comm, model, optimizer, rng=rng, n_rows=len(X))
    forward = _step_forward(model)
    sets_gradients = _backward_sets_gradients(model)
    next_seed = getattr(model, "next_step_seed", None)
    if callable(getattr(model, "set_training", None)):
        model.set_training(True)

    history: History = {}
    n = len(X)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = rng.permutation(n)
        batches = (replicas.shard(order, batch_size) if replicas is not None
                   else shard_batches(order, batch_size))
        steps = len(batches)
        total_loss = 0.0
        correct = 0
        seen = 0
        for step, (batch, row_offset, global_rows) in enumerate(batches):
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
                    step_correct += _correct(output, yb, loss)
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
            _uninterrupted(optimizer.step)
            total_loss += step_loss
            correct += step_correct
            seen += global_rows
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
    return history


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


def _forward_layers(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A forward pass that stores nothing: through the layers one by one when there are any."""
    layers: Optional[Sequence] = model if isinstance(model, (list, tuple)) else \
        getattr(model, "layers", None)
    if layers:
        def run(x: np.ndarray) -> np.ndarray:
            for layer in layers:
                x = layer.forward(x)
            return x
        return run
    return as_model(model).forward


@contextlib.contextmanager
def evaluation_mode(model: Any):
    """Run the model in evaluation mode (Dropout off), then restore each part's previous mode."""
    parts = list(model) if isinstance(model, (list, tuple)) else [model]
    switchable = [part for part in parts if callable(getattr(part, "set_training", None))]
    before = [bool(getattr(part, "is_training", True)) for part in switchable]
    for part in switchable:
        part.set_training(False)
    try:
        yield
    finally:
        for part, mode in zip(switchable, before):
            part.set_training(mode)


def predict(model: Any, X: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's outputs for X (cast to the model's dtype), computed batch by batch in
    evaluation mode (Dropout off); the model's mode is restored afterwards."""
    dtype = model_dtype(model)
    batch_size = check_size(batch_size, "batch_size")
    _refuse_masked(X, "X")
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (samples, features), got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise TypeError(f"X must hold real numbers, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=dtype)
    run = _forward_layers(model)
    # An empty X still runs one (empty) batch, so the result has the output's width.
    starts = range(0, max(len(X), 1), batch_size)
    with evaluation_mode(model):
        return np.concatenate([np.array(run(X[i:i + batch_size])) for i in starts])


def evaluate(model: Any, X: np.ndarray, y: np.ndarray, *, loss: str = "cross_entropy",
             batch_size: int = 256, comm: Any = None) -> Dict[str, float]:
    """Mean loss (and accuracy for cross_entropy) of the model on (X, y), in evaluation mode.

    With an mpi4py communicator ``comm``, each rank evaluates a share of the rows and the
    metrics are reduced over the ranks (call it on every rank).
    """
    if comm is not None:
        from ckpt import distributed
        return distributed.evaluate(model, X, y, comm, loss=loss, batch_size=batch_size)
    loss_fn = get_loss(loss)
    X, y = _check_inputs(X, y, model_dtype(model), loss)
    if len(X) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    output = predict(model, X, batch_size)
    value, _ = loss_fn(output, y)
    result = {"loss": value}
    if loss == "cross_entropy":
        result["accuracy"] = _correct(output, y, loss) / len(X)
    return result
