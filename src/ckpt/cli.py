"""The ``ckpt`` command line (also ``python -m ckpt``).

``ckpt train`` trains a checkpointed MLP on the bundled digits (or on ``--data FILE``) and ends
with one screen: test accuracy, time, peak activation memory with and without checkpointing, and
the compute spent on recomputation. Subcommands register themselves in ``SUBCOMMANDS``.
Bad arguments or data, and sizes that cannot fit in memory, print one line to stderr and exit
with status 2; Ctrl-C prints one line (what was trained and saved) and exits with status 130.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io as _io
import json
import math
import os
import sys
import time
import zipfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ckpt import _core, distributed, get_num_threads, set_num_threads
from ckpt.activations import NAMES as ACTIVATION_NAMES
from ckpt.threads import MODES, get_threading_mode, threading_mode
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.losses import softmax_cross_entropy
from ckpt.optim import OPTIMIZERS
from ckpt.units import format_size, parse_size
from ckpt.costs import ChainCosts
from ckpt.train import build_mlp, describe_architecture, evaluate, fit, mlp_costs

DEFAULTS = {
    "depth": 8,
    "width": 128,
    "activation": "relu",
    "batch_size": 32,
    "epochs": 30,
    "optimizer": "adam",
    "dtype": "float32",
    "seed": 0,
}
# Learning rates that suit the digits MLP, per optimizer (SGD runs with momentum 0.9); the deep
# residual MLP (--residual) generalises better with Adam at half the rate (97.2% against 95.8-96.7%
# test accuracy at 128 blocks, bench/resmlp_accuracy.py).
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_LR_RESIDUAL = {"sgd": 0.05, "adam": 5e-4, "adamw": 5e-4}
TEST_FRACTION = 0.2


class UsageError(ValueError):
    """Bad input found after parsing (data files, option combinations): exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but errors are one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, named `what` in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def _size(text: str) -> int:
    """A byte size with an optional unit: 4096, 200KiB, 1.5MiB, 2GB."""
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def _widths(text: str) -> List[int]:
    """Comma-separated activation widths a_0,...,a_N."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(widths) < 2 or min(widths) <= 0:
        raise argparse.ArgumentTypeError(f"expected at least two positive widths, got {text!r}")
    return widths


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


# ------------------------------------------------------------------------------------ data

def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The bundled UCI digits: X (1797, 64) uint8 in 0..16, y (1797,) uint8 in 0..9."""
    raw = (resources.files("ckpt") / "data" / "digits.npz").read_bytes()
    with np.load(_io.BytesIO(raw)) as data:
        return data["X"], data["y"]


def load_data_file(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """X and y from an .npz (arrays X and y) or a .csv (the label in the last column)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in ("X", "y") if key in data.files}
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise UsageError(f"{path} is not a readable .npz file ({exc})") from None
        missing = [key for key in ("X", "y") if key not in arrays]
        if missing:
            raise UsageError(f"{path} has no array {missing[0]!r} (it needs X and y)")
        X, y = arrays["X"], arrays["y"]
    elif suffix == ".csv":
        X, y = _read_csv(path)
    else:
        raise UsageError(f"{path}: expected a .npz or .csv file")
    return X, y


def _read_csv(path: str) -> Tuple[np.ndarray, np.ndarray]:
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if lines and not _is_numeric_row(lines[0]):
        lines = lines[1:]          # a header
    if not lines:
        raise UsageError(f"{path} holds no data rows")
    try:
        table = np.loadtxt(lines, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise UsageError(f"{path} is not a numeric CSV table ({exc})") from None
    if table.shape[1] < 2:
        raise UsageError(f"{path} needs at least one feature column and the label column")
    return table[:, :-1], table[:, -1]


def _is_numeric_row(line: str) -> bool:
    try:
        [float(field) for field in line.split(",")]
    except ValueError:
        return False
    return True


def prepare_labels(X: np.ndarray, y: np.ndarray,
                   source: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check X and y; returns X as float64, labels 0..C-1 and the original class values."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[1] == 0:
        raise UsageError(f"{source}: X must be a 2-D table of features, got shape {X.shape}")
    if y.ndim != 1:
        raise UsageError(f"{source}: y must be 1-D (one label per row), got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise UsageError(f"{source}: {X.shape[0]} rows of features but {y.shape[0]} labels")
    if not (np.issubdtype(X.dtype, np.number) and not np.issubdtype(X.dtype, np.complexfloating)):
        raise UsageError(f"{source}: features must be real numbers, got {X.dtype}")
    X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise UsageError(f"{source}: the features contain NaN or infinite values")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise UsageError(f"{source}: labels must be whole numbers (class indices)")
        huge = np.flatnonzero(np.abs(y) > 2**53)
        if len(huge):
            raise UsageError(f"{source}: label {y[huge[0]]:g} in row {huge[0]} is too large for "
                             f"a class value (at most 2**53 in magnitude)")
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"{source}: labels must be integers, got {y.dtype}")
    classes, labels = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise UsageError(f"{source}: need at least 2 classes, got {len(classes)}")
    return X, labels.astype(np.int64), classes


def stratified_split(y: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded train/test indices with each class split in the same proportion."""
    test: List[np.ndarray] = []
    train: List[np.ndarray] = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    if len(test_idx) == 0:
        raise UsageError("too few rows to hold out a test split")
    return rng.permutation(train_idx), np.sort(test_idx)


# ------------------------------------------------------------------------------------ measures

def measure_step(layers: Sequence, xb: np.ndarray, yb: np.ndarray, **schedule) -> int:
    """Peak activation bytes of one training step on copies of the layers.

    ``schedule`` is what SegmentCheckpointer takes: checkpoint_every=, or budget_bytes=.
    """
    model = SegmentCheckpointer(copy.deepcopy(list(layers)), **schedule)
    _, grad = softmax_cross_entropy(model.forward(xb), yb)
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


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:,.1f} KiB"


# ------------------------------------------------------------------------------------ train

def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a checkpointed MLP classifier",
        description="Train an MLP with gradient checkpointing on the bundled UCI digits "
                    "(or --data FILE), holding out 20%% for testing.")
    p.add_argument("--data", metavar="FILE",
                   help=".npz with arrays X and y, or .csv with the label in the last column "
                        "(default: the bundled 8x8 digits)")
    p.add_argument("--depth", type=_positive_int, default=DEFAULTS["depth"],
                   help="number of Dense layers, or of residual blocks with --residual "
                        "(default %(default)s)")
    p.add_argument("--width", type=_positive_int, default=DEFAULTS["width"],
                   help="hidden layer width (default %(default)s)")
    p.add_argument("--residual", action="store_true",
                   help="a pre-norm residual MLP: input projection, DEPTH blocks x + "
                        "f(LayerNorm(x)), LayerNorm, output layer (see ckpt.build_mlp)")
    p.add_argument("--dropout", type=_probability, default=0.0, metavar="P",
                   help="dropout probability after each hidden layer (inside each block with "
                        "--residual; default 0)")
    p.add_argument("--activation", default=DEFAULTS["activation"],
                   choices=ACTIVATION_NAMES,
                   help="hidden activation (default %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULTS["batch_size"],
                   help="default %(default)s")
    p.add_argument("--epochs", type=_positive_int, default=DEFAULTS["epochs"],
                   help="default %(default)s")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: 1e-3 for adam and adamw, 5e-4 with --residual; "
                        "0.05 for sgd)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=DEFAULTS["optimizer"],
                   help="default %(default)s (sgd uses momentum 0.9)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=DEFAULTS["dtype"],
                   help="default %(default)s")
    p.add_argument("--seed", type=_non_negative_int, default=DEFAULTS["seed"],
                   help="seeds the split, the weights and the shuffling (default %(default)s)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--checkpoint-every", type=_non_negative_int, default=None, metavar="K",
                     help="keep every K-th activation (default floor(sqrt(depth)); 1 = keep all)")
    how.add_argument("--budget", type=_size, default=None, metavar="SIZE",
                     help="plan the checkpoints to hold at most SIZE of activations and gradient "
                          "buffers (e.g. 200KiB, 4MiB); see `ckpt plan`")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads of a training step (default: the cores ckpt may use, from the "
                        "affinity mask and the cgroup CPU quota, bounded by OPENBLAS_NUM_THREADS "
                        "or threadpoolctl; under mpiexec, per rank: the node's cores divided by "
                        "its ranks)")
    p.add_argument("--threads-mode", choices=list(MODES), default=None,
                   help="tuned (default, or CKPT_THREADS_MODE; --threads alone means blas): "
                        "the OpenBLAS thread count measured fastest; auto: tuned, batch split "
                        "included; blas: OpenBLAS threads each matrix product; split: each "
                        "thread runs a slice of the batch")
    p.add_argument("--save", metavar="FILE", help="save parameters and optimizer state (.npz)")
    p.add_argument("--json", action="store_true",
                   help="end the output with one line of JSON holding the results")
    p.set_defaults(run=run_train, comm=None)


def run_train(args: argparse.Namespace) -> int:
    world = distributed.detect_world()   # from the environment: mpi4py is not imported yet
    if world is not None and world.size > 1:
        return _run_train_data_parallel(args, world)
    threads = get_num_threads()
    if args.threads is not None:
        set_num_threads(args.threads)
    status: Dict[str, Any] = {"epochs": 0, "saved": None}
    try:
        fixed = "blas" if args.threads is not None else get_threading_mode()
        with threading_mode(args.threads_mode or fixed):
            return _train(args, status)
    except KeyboardInterrupt:
        done = f"after epoch {status['epochs']}" if status["epochs"] else "before any epoch ended"
        saved = f"saved {status['saved']}" if status["saved"] else "nothing saved"
        raise KeyboardInterrupt(f"interrupted {done}; {saved}") from None
    finally:
        set_num_threads(threads)


def _run_train_data_parallel(args: argparse.Namespace, world: distributed.World) -> int:
    """``mpiexec -n K ckpt train``: train data-parallel over the launcher's K ranks.

    Rank 0 alone prints and saves; an error on any rank prints one line naming the rank and
    aborts the whole job (ckpt.distributed.abort_on_error).
    """
    try:
        comm = distributed.world_comm()
    except ImportError as exc:
        if world.rank != 0:
            raise SystemExit(2) from None
        raise UsageError(f"launched as rank {world.rank} of {world.size} by an MPI launcher, "
                         f"but {exc}") from None
    threads = get_num_threads()
    set_num_threads(args.threads or distributed.default_threads(world))
    args.comm = comm
    status: Dict[str, Any] = {"epochs": 0, "saved": None}
    try:
        with distributed.abort_on_error(comm, "ckpt train"):
            if comm.Get_rank() == 0:
                return _train(args, status)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return _train(args, status)
    finally:
        set_num_threads(threads)


def _train(args: argparse.Namespace, status: Dict[str, Any]) -> int:
    """Train, test and report; ``status`` records the epochs done and the file saved."""
    if args.data is None:
        X, y = load_digits()
        X, y, classes = prepare_labels(X, y, "digits")
        X = X / 16.0
        source = "UCI digits (bundled, 1,797 8x8 images)"
    else:
        X, y, classes = prepare_labels(*load_data_file(args.data), args.data)
        source = args.data
    rng = np.random.default_rng(args.seed)
    train_idx, test_idx = stratified_split(y, TEST_FRACTION, rng)
    if args.data is not None:
        mean = X[train_idx].mean(axis=0)
        std = X[train_idx].std(axis=0)
        X = (X - mean) / np.where(std > 0, std, 1.0)
    dtype = np.dtype(args.dtype)
    X = X.astype(dtype)
    X_train, y_train, X_test, y_test = X[train_idx], y[train_idx], X[test_idx], y[test_idx]

    layers = build_mlp(X.shape[1], args.depth, args.width, len(classes), args.activation,
                       dtype, rng, residual=args.residual, dropout=args.dropout)
    schedule = ({"budget_bytes": args.budget} if args.budget is not None
                else {"checkpoint_every": args.checkpoint_every})
    model = SegmentCheckpointer(layers, **schedule, seed=args.seed)
    ranks = args.comm.Get_size() if args.comm is not None else 1
    lr = args.lr if args.lr is not None else \
        (DEFAULT_LR_RESIDUAL if args.residual else DEFAULT_LR)[args.optimizer]
    optimizer = (OPTIMIZERS["sgd"](model, lr, momentum=0.9) if args.optimizer == "sgd"
                 else OPTIMIZERS[args.optimizer](model, lr))
    k = model.checkpoint_every
    how = f"checkpoint every {k}" if k is not None else f"budget {format_size(args.budget)}"

    print(f"data: {source}: {len(train_idx)} train / {len(test_idx)} test rows, "
          f"{X.shape[1]} features, {len(classes)} classes")
    print(f"model: {describe_architecture(layers)}, width {args.width}, {args.activation}, "
          f"{args.dtype}, {model.parameter_count:,} parameters; {how}; "
          f"{args.optimizer} lr {lr:g}")
    if ranks > 1:
        print(f"data-parallel: {ranks} ranks x batch {args.batch_size} = global batch "
              f"{ranks * args.batch_size}, BLAS threads per rank: {get_num_threads()}")
    sys.stdout.flush()

    if args.save:
        from ckpt.io import check_save_path
        check_save_path(args.save)       # before training, not after

    progress = _Progress(model, args.epochs, enabled=sys.stdout.isatty())

    def epoch_done(metrics: Dict[str, float]) -> None:
        status["epochs"] = metrics["epoch"]
        progress.epoch(metrics)

    start = time.perf_counter()
    try:
        history = fit(model, X_train, y_train, optimizer=optimizer, epochs=args.epochs,
                      batch_size=args.batch_size, seed=rng, step_callback=progress.step,
                      callback=epoch_done, comm=args.comm)
    finally:
        progress.close()
    seconds = time.perf_counter() - start

    test = evaluate(model, X_test, y_test, comm=args.comm)
    batch = min(args.batch_size, len(X_train))
    xb, yb = X_train[:batch], y_train[:batch]
    peak = measure_step(model.layers, xb, yb, **schedule)
    peak_plain = measure_step(model.layers, xb, yb, checkpoint_every=1)
    recomputed, extra = recompute_cost(model, batch)
    if args.save and (args.comm is None or args.comm.Get_rank() == 0):
        from ckpt.io import save
        save(args.save, model, optimizer)
        status["saved"] = args.save

    results = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "train_loss": history["loss"][-1],
        "train_accuracy": history["accuracy"][-1],
        "seconds": seconds,
        "epochs": args.epochs,
        "steps": args.epochs * math.ceil(len(X_train) / (ranks * args.batch_size)),
        "ranks": ranks,
        "global_batch_size": ranks * args.batch_size,
        "architecture": describe_architecture(layers),
        "elements": len(model),
        "checkpoint_every": k,
        "budget_bytes": args.budget,
        "peak_activation_bytes": peak,
        "peak_activation_bytes_plain": peak_plain,
        "peak_activation_bytes_training": model.memory_tracker.peak_bytes,
        "recomputed_layer_forwards_per_step": recomputed,
        "recompute_flops_fraction": extra,
        "optimizer_state_bytes": optimizer.state_bytes,
        "parameter_count": model.parameter_count,
        "threads": get_num_threads(),
        "threads_mode": "split" if model.slices(batch) > 1 else "blas",
        "threads_tuning": model.threads_tuning.report(),
        "simd": _core.simd_variant(),
    }
    saving = 1 - peak / peak_plain if peak_plain else 0.0
    print(f"test accuracy     {test['accuracy']:.2%}   (loss {test['loss']:.4f}; "
          f"train accuracy {results['train_accuracy']:.2%})")
    print(f"training time     {seconds:.2f} s for {args.epochs} epochs, "
          f"{results['steps'] / seconds:,.0f} steps/s")
    print(f"peak activations  {_kib(peak)} with checkpointing ({how}), "
          f"{_kib(peak_plain)} without: {saving:.0%} less (batch {batch})")
    print(f"recomputation     {recomputed} of {len(model)} element forwards per step, "
          f"+{extra:.1%} of a step's FLOPs")
    print(f"optimizer state   {_kib(optimizer.state_bytes)}")
    print(f"threads           {results['threads']}, {results['threads_mode']} "
          f"({args.threads_mode or get_threading_mode()} mode)")
    if args.save:
        print(f"saved             {args.save}")
    if args.json:
        print(json.dumps(results))
    return 0


class _Progress:
    """One tqdm bar per epoch: loss, accuracy, steps/s, live and peak tracked memory."""

    def __init__(self, model: SegmentCheckpointer, epochs: int, enabled: bool) -> None:
        self.model = model
        self.epochs = epochs
        self.enabled = enabled
        self.bar = None

    def step(self, info: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=info["steps"], desc=f"epoch {info['epoch']}/{self.epochs}",
                            unit="step", file=sys.stdout, dynamic_ncols=True)
        tracker = self.model.memory_tracker
        live = tracker.stored_activation_bytes + tracker.gradient_bytes
        self.bar.set_postfix_str(f"loss={info['loss']:.4f} acc={info['accuracy']:.3f} "
                                 f"mem={_kib(live)} peak={_kib(tracker.peak_bytes)}",
                                 refresh=False)
        self.bar.update(1)

    def epoch(self, metrics: Dict[str, float]) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------ plan

def add_plan_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="plan checkpoints for a memory budget and show what it costs",
        description="Plan the checkpoints of a Dense chain under a memory budget (the least "
                    "recomputation that fits), print the plan and the memory-versus-compute "
                    "trade-off, before any training.")
    p.add_argument("--depth", type=_positive_int, default=DEFAULTS["depth"],
                   help="number of Dense layers (default %(default)s)")
    p.add_argument("--width", type=_positive_int, default=DEFAULTS["width"],
                   help="width of every activation, input and output included (default %(default)s)")
    p.add_argument("--widths", type=_widths, default=None, metavar="W0,W1,...",
                   help="the activation widths a_0..a_N instead of --depth/--width")
    p.add_argument("--residual", action="store_true",
                   help="plan the pre-norm residual MLP of `ckpt train --residual` (input and "
                        "output of width --width; --depth counts blocks)")
    p.add_argument("--dropout", type=_probability, default=0.0, metavar="P",
                   help="with --residual: a Dropout inside each block (it costs one element)")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULTS["batch_size"],
                   help="default %(default)s")
    p.add_argument("--budget", type=_size, default=None, metavar="SIZE",
                   help="memory for activations (e.g. 300KiB, 4MiB; default: what "
                        "floor(sqrt(depth)) uniform segments need)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=DEFAULTS["dtype"],
                   help="default %(default)s")
    p.add_argument("--method", choices=["auto", "optimal", "persistent"], default="auto",
                   help="auto (default): the exact search on short chains, else bounded searches "
                        "compared with every uniform schedule (about a second for 200 layers); "
                        "optimal: least recomputation over all schedules (can take minutes on "
                        "long uneven chains); persistent: over schedules that keep a checkpoint "
                        "until its backward (rotor)")
    p.add_argument("--points", type=_positive_int, default=8,
                   help="rows of the trade-off table (default %(default)s)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the trade-off curve (needs matplotlib)")
    p.add_argument("--json", action="store_true",
                   help="end the output with one line of JSON holding the plan's figures")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from ckpt.plan import plan, tradeoff, uniform_plan

    if args.residual and args.widths:
        raise UsageError("--residual plans build_mlp's residual network: give --depth and "
                         "--width, not --widths")
    if args.residual:
        chain = mlp_costs(args.width, args.depth, args.width, args.width, residual=True,
                          dropout=args.dropout)
    else:
        chain = ChainCosts.from_widths(args.widths or [args.width] * (args.depth + 1))
    widths = list(chain.widths)
    dtype = np.dtype(args.dtype)
    budget = args.budget
    if budget is None:
        budget = uniform_plan(chain, args.batch_size, max(1, math.isqrt(len(chain))),
                              dtype).peak_bytes
    chosen = plan(chain, args.batch_size, budget, dtype, method=args.method)
    print(chosen.explain())
    curve = tradeoff(chain, args.batch_size, dtype, points=args.points, method=args.method)
    step_flops = 3 * chosen.plain_forward_flops
    print()
    print("memory versus compute (the least recomputation for each budget):")
    print(f"{'budget':>12}  {'peak':>12}  {'extra FLOPs':>14}  {'of a step':>9}")
    for budget_bytes, extra, peak in curve:
        print(f"{format_size(budget_bytes):>12}  {format_size(peak):>12}  {extra:>14,}  "
              f"{extra / step_flops:>9.1%}")
    if args.plot:
        _plot_tradeoff(curve, step_flops, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps({
            "widths": widths, "batch_size": args.batch_size, "budget_bytes": budget,
            "peak_bytes": chosen.peak_bytes, "plain_peak_bytes": chosen.plain_peak_bytes,
            "recompute_flops": chosen.recompute_flops,
            "forward_counts": list(chosen.forward_counts),
            "tradeoff": [{"budget_bytes": b, "recompute_flops": f, "peak_bytes": p}
                         for b, f, p in curve],
        }))
    return 0


def _plot_tradeoff(curve: Sequence[Tuple[int, int, int]], step_flops: int, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step([p / 2**20 for _, _, p in curve], [100 * f / step_flops for _, f, _ in curve],
            where="post", marker="o")
    ax.set_xlabel("peak activation memory (MiB)")
    ax.set_ylabel("extra compute (% of a training step)")
    ax.set_title("ckpt plan: memory versus recomputation")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main

# Each entry adds one subcommand to the parser; its parser sets `run` to a function
# run(args) -> exit status.
SUBCOMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [add_train_command,
                                                                  add_plan_command]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ckpt", description="Gradient checkpointing for deep MLPs on CPU.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in SUBCOMMANDS:
        add_command(subparsers)
    return parser


def _version() -> str:
    """The installed ckpt version, from its single source ``ckpt/_version.py``."""
    from ckpt._version import __version__
    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ckpt`` and ``python -m ckpt``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt as exc:
        # Ctrl-C: one line saying what was done, and the shell's status for SIGINT.
        print(f"ckpt {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError, MemoryError) as exc:
        # Bad data, files or sizes: one line, no traceback, usage-error status.
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ckpt {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
