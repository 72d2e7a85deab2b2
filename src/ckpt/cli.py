"""The ``ckpt`` command line (also ``python -m ckpt``).

``ckpt train`` trains a checkpointed MLP on the bundled digits (or ``--example diabetes``, or
``--data FILE`` read by :mod:`ckpt.datasets`: CSV, .npz, .npy, Parquet, with ``--target`` and
``--features``), as a classifier or a regression (``--task``), and ends with one screen: the
test metrics, time, peak activation memory with and without checkpointing, and the compute
spent on recomputation. ``--save`` writes a model file that predicts on raw data by itself:
``ckpt predict`` and ``ckpt evaluate`` use it (:mod:`ckpt.predictor`). ``--checkpoint-dir`` and
``--resume`` continue a killed run (:mod:`ckpt.resume`). Subcommands register themselves in
``SUBCOMMANDS``; this module parses, calls the library and prints.
Bad arguments or data, and sizes that cannot fit in memory, print one line to stderr and exit
with status 2; Ctrl-C prints one line (what was trained and saved) and exits with status 130.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ckpt import _core, distributed, get_num_threads, set_num_threads
from ckpt.activations import NAMES as ACTIVATION_NAMES
from ckpt.threads import MODES, get_threading_mode, threading_mode
from ckpt.checkpoint import SegmentCheckpointer
from ckpt.elements.dense import dense_chain
from ckpt.datasets import (EXAMPLES, Preprocessing, TrainingData, example_table,
                           prepare_training_data, read_table, write_csv)
from ckpt.inference import regression_metrics
from ckpt.measure import measure_step, recompute_cost
from ckpt.optim import OPTIMIZERS
from ckpt.optim.schedules import SCHEDULES, make_schedule
from ckpt.predictor import load_predictor, prediction_table, read_features
from ckpt.resume import StateFolder
from ckpt.units import format_size, parse_size
from ckpt.train import (NORMS, build_mlp, describe_architecture, evaluate, fit, mlp_costs,
                        predict)

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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") \
            from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:,.1f} KiB"


# ------------------------------------------------------------------------------------ train

def _columns(text: str) -> List[str]:
    """Comma-separated column names or 0-based indices."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names or indices, "
                                         f"got {text!r}")
    return names


def _add_column_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", metavar="NAME|INDEX", default=None,
                   help="the target column of a table, by header name or 0-based index "
                        "(negative from the end; default: the last column)")
    p.add_argument("--features", type=_columns, metavar="A,B,...", default=None,
                   help="the feature columns, by name or index (default: all but the target)")
    p.add_argument("--labels", metavar="FILE.npy", default=None,
                   help="with --data FILE.npy of features: the 1-D .npy of their targets")


def _add_task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["auto", "classification", "regression"], default="auto",
                   help="auto (default): integer-like targets with at most 2%% of the rows "
                        "(and at most 1,000) distinct values, or text labels, are classes; "
                        "otherwise regression (squared error; RMSE and R^2 reported)")
    p.add_argument("--no-scale-target", dest="scale_target", action="store_false",
                   help="regression: train on the targets as they are (default: standardised "
                        "with the training rows' mean and deviation, undone in predictions)")


def _read_data(args: argparse.Namespace, dtype: np.dtype):
    """(table, its fixed scaling or None): the --data file, or the bundled --example."""
    if args.data is None:
        for option in ("target", "features", "labels"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option} applies to a --data file, not to the bundled "
                                 f"{args.example or 'digits'}")
        return example_table(args.example or "digits", dtype)
    if args.example is not None:
        raise UsageError("--example trains on a bundled data set: leave out --data")
    return read_table(args.data, target=args.target, features=args.features,
                      labels=args.labels, dtype=dtype), None


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a checkpointed MLP classifier",
        description="Train an MLP with gradient checkpointing on the bundled UCI digits "
                    "(or --data FILE), holding out 20%% for testing.")
    p.add_argument("--data", metavar="FILE",
                   help=".csv (with or without a header), .npz with arrays X and y, .npy (a "
                        "table, or the features with --labels), or .parquet (needs pyarrow: "
                        "ckpt-cpu[parquet]); default: the bundled 8x8 digits")
    p.add_argument("--example", choices=list(EXAMPLES), default=None,
                   help="a bundled data set instead of --data: digits (the default) or "
                        "diabetes (regression; needs scikit-learn, ckpt-cpu[sklearn])")
    _add_column_options(p)
    _add_task_options(p)
    p.add_argument("--depth", type=_positive_int, default=DEFAULTS["depth"],
                   help="number of Dense layers, or of residual blocks with --residual "
                        "(default %(default)s)")
    p.add_argument("--width", type=_positive_int, default=DEFAULTS["width"],
                   help="hidden layer width (default %(default)s)")
    p.add_argument("--residual", action="store_true",
                   help="a pre-norm residual MLP: input projection, DEPTH blocks x + "
                        "f(norm(x)), norm, output layer (see ckpt.build_mlp)")
    p.add_argument("--norm", choices=NORMS, default=None,
                   help="layer: a LayerNorm after each hidden layer; batch: Dense -> BatchNorm "
                        "-> activation blocks, or with --residual the tabular ResNet (BatchNorm "
                        "blocks); with --residual the default is layer")
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
    p.add_argument("--val-fraction", type=_fraction, default=0.0, metavar="F",
                   help="hold out F of the training rows for validation after every epoch "
                        "(stratified by class for classification; default 0: none)")
    p.add_argument("--sync-batchnorm", action="store_true",
                   help="under mpiexec: BatchNorm statistics of the global batch, not each "
                        "rank's (its sums allreduced; every rank needs 2 rows in every step)")
    p.add_argument("--early-stopping", type=_positive_int, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a lower validation loss and keep "
                        "the best epoch's parameters (needs --val-fraction)")
    p.add_argument("--lr-schedule", choices=sorted(SCHEDULES), default="constant",
                   help="learning rate per batch: constant (default), cosine (linear warmup, "
                        "then cosine decay to 0) or onecycle (up from lr/25, then down)")
    p.add_argument("--warmup", type=_probability, default=None, metavar="F",
                   help="the fraction of the steps that warm up: cosine (default 0), onecycle "
                        "(default 0.3)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=None, metavar="WD",
                   help="L2 weight decay (sgd, adam), decoupled for adamw (default 0; adamw "
                        "0.01)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw loss and accuracy (or RMSE) per epoch, train and validation "
                        "(needs matplotlib)")
    p.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="write a resumable training state to DIR (atomically) at the end of "
                        "every epoch, keeping the last 2; resume with --resume DIR")
    p.add_argument("--checkpoint-steps", type=_positive_int, default=None, metavar="N",
                   help="with --checkpoint-dir or --resume: also write a state every N "
                        "optimizer steps")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run whose states are in DIR (and keep writing them "
                        "there): the same model and data arguments, --epochs may grow; the "
                        "state's threads and threading mode are used")
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
    p.add_argument("--save", metavar="FILE",
                   help="save the model (.npz): parameters, optimizer state, and the feature "
                        "and target scaling, classes and columns, for `ckpt predict`")
    p.add_argument("--json", action="store_true",
                   help="end the output with one line of JSON holding the results")
    p.set_defaults(run=run_train, comm=None)


def run_train(args: argparse.Namespace) -> int:
    world = distributed.detect_world()   # from the environment: mpi4py is not imported yet
    _open_run_state(args, writer=world is None or world.rank == 0)
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


# The arguments that make a run what it is: resuming with any of them changed is refused.
RUN_ARGUMENTS = ("data", "example", "target", "features", "labels", "task", "scale_target", "depth",
                 "width", "residual", "norm", "sync_batchnorm", "dropout", "activation",
                 "batch_size", "lr",
                 "optimizer",
                 "dtype", "seed", "checkpoint_every", "budget", "val_fraction",
                 "early_stopping", "lr_schedule", "warmup", "weight_decay")


def _run_arguments(args: argparse.Namespace, ranks: int) -> Dict[str, Any]:
    config = {name: getattr(args, name) for name in RUN_ARGUMENTS}
    if args.data is not None:
        config["data"] = os.path.abspath(args.data)
        config["data_bytes"] = os.path.getsize(args.data)
    config["ranks"] = ranks
    return config


def _open_run_state(args: argparse.Namespace, writer: bool) -> None:
    """Set args.run_state (a StateFolder, or None) from --checkpoint-dir / --resume; on resume
    refuse other run arguments (naming each difference) and take the state's threads."""
    args.run_state = None
    if args.checkpoint_steps is not None and not (args.checkpoint_dir or args.resume):
        raise UsageError("--checkpoint-steps needs --checkpoint-dir or --resume")
    if args.checkpoint_dir and args.resume and \
            os.path.abspath(args.checkpoint_dir) != os.path.abspath(args.resume):
        raise UsageError("--resume keeps writing its states in its own folder: give "
                         "--checkpoint-dir the same folder, or leave it out")
    if not (args.checkpoint_dir or args.resume):
        return
    world = distributed.detect_world()
    config = _run_arguments(args, world.size if world is not None else 1)
    if args.resume is None:
        args.run_state = StateFolder(args.checkpoint_dir, every_steps=args.checkpoint_steps,
                                     writer=writer,
                                     info={"arguments": config, "epochs": args.epochs})
        return
    folder = StateFolder(args.resume, every_steps=args.checkpoint_steps, resume=True,
                         writer=writer)
    state = folder.resume_from
    saved = state.info.get("arguments", {})
    differences = [f"{_option(name)} {config.get(name)!r} (the state's: {saved.get(name)!r})"
                   for name in sorted(set(config) | set(saved))
                   if config.get(name) != saved.get(name)]
    if differences:
        raise UsageError(f"--resume {args.resume}: the state is of another run: "
                         f"{'; '.join(differences)}")
    if args.epochs < state.epoch:
        raise UsageError(f"--resume {args.resume}: the state has {state.epoch} epochs done, "
                         f"more than --epochs {args.epochs}")
    for name, value in (("threads", state.info.get("threads")),
                        ("threads_mode", state.info.get("threads_mode"))):
        given = getattr(args, name)
        if given is not None and given != value:
            raise UsageError(f"--resume {args.resume}: the state was trained with "
                             f"{_option(name)} {value}; a resumed run uses the same to compute "
                             f"the same bits (got {given})")
        setattr(args, name, value)
    folder.info = dict(state.info, epochs=args.epochs)
    args.run_state = folder


def _option(name: str) -> str:
    return {"data_bytes": "--data (its size in bytes)", "ranks": "MPI ranks"}.get(
        name, "--" + name.replace("_", "-"))


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
    if args.early_stopping is not None and not args.val_fraction:
        raise UsageError("--early-stopping watches the validation loss: give --val-fraction")
    if args.warmup is not None and args.lr_schedule == "constant":
        raise UsageError("--warmup needs --lr-schedule cosine or onecycle")
    if args.plot:
        _require_matplotlib("--plot")
        from ckpt.io import check_save_path
        check_save_path(args.plot)       # a folder that exists and can be written: before training
    dtype = np.dtype(args.dtype)
    table, fixed_scaler = _read_data(args, dtype)
    rng = np.random.default_rng(args.seed)
    data = prepare_training_data(table, rng, test_fraction=TEST_FRACTION,
                                 val_fraction=args.val_fraction, task=args.task,
                                 scaler=fixed_scaler,
                                 scale_target=args.scale_target)
    X_train, y_train, X_test, y_test = data.X_train, data.y_train, data.X_test, data.y_test
    source, features = table.source, table.X.shape[1]
    classification = data.task == "classification"
    loss = "cross_entropy" if classification else "mse"
    outputs = len(data.classes) if classification else 1

    layers = build_mlp(features, args.depth, args.width, outputs, args.activation,
                       dtype, rng, residual=args.residual, norm=args.norm, dropout=args.dropout)
    schedule = ({"budget_bytes": args.budget} if args.budget is not None
                else {"checkpoint_every": args.checkpoint_every})
    model = SegmentCheckpointer(layers, **schedule, seed=args.seed)
    ranks = args.comm.Get_size() if args.comm is not None else 1
    if args.sync_batchnorm and args.comm is None:
        raise UsageError("--sync-batchnorm synchronises BatchNorm across MPI ranks: run ckpt "
                         "train under mpiexec -n K (K > 1)")
    lr = args.lr if args.lr is not None else \
        (DEFAULT_LR_RESIDUAL if args.residual else DEFAULT_LR)[args.optimizer]
    decay = {} if args.weight_decay is None else {"weight_decay": args.weight_decay}
    optimizer = (OPTIMIZERS["sgd"](model, lr, momentum=0.9, **decay) if args.optimizer == "sgd"
                 else OPTIMIZERS[args.optimizer](model, lr, **decay))
    schedule_fn = (None if args.lr_schedule == "constant"
                   else make_schedule(args.lr_schedule, lr, args.warmup))
    validation = (data.X_val, data.y_val) if data.X_val is not None else None
    k = model.checkpoint_every
    how = f"checkpoint every {k}" if k is not None else f"budget {format_size(args.budget)}"

    targets = f"{len(data.classes)} classes" if classification else (
        "target standardised" if data.target_scaler is not None else "target as it is")
    val_rows = f"{len(data.X_val)} validation / " if data.X_val is not None else ""
    print(f"data: {source}: {len(X_train)} train / {val_rows}{len(X_test)} test rows, "
          f"{features} features, {targets}")
    print(f"task: {data.task_reason}")
    print(f"model: {describe_architecture(layers)}, width {args.width}, {args.activation}, "
          f"{args.dtype}, {model.parameter_count:,} parameters; {how}; "
          f"{args.optimizer} lr {lr:g}"
          + (f" ({args.lr_schedule} schedule)" if schedule_fn is not None else "")
          + (f", weight decay {optimizer.weight_decay:g}" if optimizer.weight_decay else ""))
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

    run_state = args.run_state
    if run_state is not None:
        run_state.info.update(threads=get_num_threads(), threads_mode=get_threading_mode())
        if run_state.resume_from is not None:
            resumed = run_state.resume_from
            print(f"resumed           from {args.resume}: epoch {resumed.epoch} done, "
                  f"{resumed.step} steps into the next"
                  + "".join(f"; skipped {reason}" for reason in run_state.skipped))
    start = time.perf_counter()
    try:
        history = fit(model, X_train, y_train, loss=loss, optimizer=optimizer, epochs=args.epochs,
                      validation_data=validation, lr_schedule=schedule_fn,
                      early_stopping=args.early_stopping, run_state=run_state,
                      batch_size=args.batch_size, seed=rng, step_callback=progress.step,
                      callback=epoch_done, comm=args.comm,
                      sync_batchnorm=args.sync_batchnorm)
    finally:
        progress.close()
    seconds = time.perf_counter() - start

    test = _test_metrics(model, data, args.comm)
    batch = min(args.batch_size, len(X_train))
    xb, yb = X_train[:batch], y_train[:batch]
    peak = measure_step(model.layers, xb, yb, loss=loss, **schedule)
    peak_plain = measure_step(model.layers, xb, yb, loss=loss, checkpoint_every=1)
    recomputed, extra = recompute_cost(model, batch)
    if args.save and (args.comm is None or args.comm.Get_rank() == 0):
        from ckpt.io import save
        save(args.save, model, optimizer, Preprocessing.from_training(data))
        status["saved"] = args.save

    epochs_run = len(history["loss"])
    # The parameters kept: the last epoch's, or the best one's under early stopping.
    best = epochs_run - 1 if args.early_stopping is None else \
        int(np.argmin(history["val_loss"]))
    results = {
        "task": data.task,
        **{f"test_{key}": value for key, value in test.items()},
        "train_loss": history["loss"][best],
        **({"train_accuracy": history["accuracy"][best]} if classification else {}),
        **({"val_loss": history["val_loss"][best]} if validation is not None else {}),
        **({"val_accuracy": history["val_accuracy"][best]}
           if validation is not None and classification else {}),
        "seconds": seconds,
        "epochs": epochs_run,
        "best_epoch": best + 1,
        "steps": epochs_run * math.ceil(len(X_train) / (ranks * args.batch_size)),
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
        "history": history,
    }
    saving = 1 - peak / peak_plain if peak_plain else 0.0
    if classification:
        print(f"test accuracy     {test['accuracy']:.2%}   (loss {test['loss']:.4f}; "
              f"train accuracy {results['train_accuracy']:.2%})")
    else:
        print(f"test RMSE         {test['rmse']:.6g}   (R^2 {test['r2']:.4f}; train loss "
              f"{results['train_loss']:.4f}{' standardised' if data.target_scaler else ''})")
    if validation is not None:
        metric = (f"accuracy {results['val_accuracy']:.2%}, " if classification else "")
        print(f"validation        {metric}loss {results['val_loss']:.4f} at epoch {best + 1}")
    if args.early_stopping is not None:
        stopped = f"stopped after epoch {epochs_run}" if epochs_run < args.epochs else \
            f"ran all {epochs_run} epochs"
        print(f"early stopping    {stopped}; kept epoch {best + 1}, the lowest validation "
              f"loss (patience {args.early_stopping})")
    print(f"training time     {seconds:.2f} s for {epochs_run} epochs, "
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
    if args.plot and (args.comm is None or args.comm.Get_rank() == 0):
        _plot_history(history, data, args.plot)
        print(f"plot              {args.plot}")
    if args.json:
        print(json.dumps(results))
    return 0


def _require_matplotlib(option: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{option} needs matplotlib: pip install matplotlib (it comes with "
                         f"the ckpt-cpu[bench] extra)") from None


def _plot_history(history: Dict[str, List[float]], data: TrainingData, path: str) -> None:
    """Loss and accuracy (classification) or RMSE in the target's units (regression) per
    epoch, for the training rows (the running mean over each epoch) and the validation rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history["epoch"]
    if data.task == "classification":
        metric, curves = "accuracy", {key: history[key] for key in ("accuracy", "val_accuracy")
                                      if key in history}
    else:
        scale = float(data.target_scaler.scale[0]) if data.target_scaler is not None else 1.0
        metric = "RMSE"
        curves = {key.replace("loss", "rmse"): [scale * v ** 0.5 for v in history[key]]
                  for key in ("loss", "val_loss") if key in history}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "val_loss"):
        if key in history:
            left.plot(epochs, history[key], marker=".",
                      label="validation" if key.startswith("val") else "train")
    for key, values in curves.items():
        right.plot(epochs, values, marker=".",
                   label="validation" if key.startswith("val") else "train")
    left.set_ylabel("loss" + (" (standardised target)" if data.target_scaler else ""))
    right.set_ylabel(metric)
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("ckpt train")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _test_metrics(model: SegmentCheckpointer, data: TrainingData, comm: Any) -> Dict[str, float]:
    """Test loss and accuracy, or RMSE and R^2 in the target's own units (and the loss, the
    mean squared error in the units trained on)."""
    if data.task == "classification":
        return evaluate(model, data.X_test, data.y_test, comm=comm)
    scaled = predict(model, data.X_test)[:, 0]
    values = data.target_scaler.inverse(scaled[:, None])[:, 0] if data.target_scaler \
        else scaled
    metrics = regression_metrics(data.y_test, values)
    trained_on = data.target_scaler.transform(data.y_test[:, None].copy())[:, 0] \
        if data.target_scaler else data.y_test
    return {"rmse": metrics["rmse"], "r2": metrics["r2"],
            "loss": regression_metrics(trained_on, scaled)["mse"]}


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
        acc = f" acc={info['accuracy']:.3f}" if "accuracy" in info else ""
        self.bar.set_postfix_str(f"loss={info['loss']:.4f}{acc} "
                                 f"mem={_kib(live)} peak={_kib(tracker.peak_bytes)}",
                                 refresh=False)
        self.bar.update(1)

    def epoch(self, metrics: Dict[str, float]) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------ predict

def add_predict_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="predict with a saved model",
        description="Predict with a model saved by `ckpt train --save`, on raw data (scaled as "
                    "in training). Writes CSV with a header: the predicted label and one "
                    "probability per class (p_<class>), or the predicted value.")
    p.add_argument("model", metavar="MODEL", help="a model file from `ckpt train --save`")
    p.add_argument("data", metavar="DATA",
                   help="features as in training (.csv, .npz, .npy, .parquet); a column named "
                        "as the training's target is left out")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="write the CSV to FILE (default: standard output)")
    p.set_defaults(run=run_predict)


def add_evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a saved model on data with targets",
        description="Score a model saved by `ckpt train --save` on DATA, which holds the "
                    "training's target column: accuracy and loss, or RMSE and R^2.")
    p.add_argument("model", metavar="MODEL", help="a model file from `ckpt train --save`")
    p.add_argument("data", metavar="DATA", help="features and target (.csv, .npz, .npy, "
                                                ".parquet)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON line")
    p.set_defaults(run=run_evaluate)


def run_predict(args: argparse.Namespace) -> int:
    if args.output is not None:
        from ckpt.io import check_save_path
        check_save_path(args.output)
    predictor = load_predictor(args.model)
    table = read_features(args.data, predictor.preprocessing, predictor.dtype)
    header, rows = prediction_table(predictor, table.X)
    if args.output is None:
        import csv
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    else:
        write_csv(args.output, header, rows)
        print(f"{len(rows):,} predictions written to {args.output}", file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    predictor = load_predictor(args.model)
    table = read_features(args.data, predictor.preprocessing, predictor.dtype, with_target=True)
    metrics = predictor.score(table.X, table.y)
    if args.json:
        print(json.dumps({"task": predictor.task, "rows": len(table.X), **metrics}))
    elif predictor.task == "classification":
        print(f"accuracy {metrics['accuracy']:.2%}   (loss {metrics['loss']:.4f}; "
              f"{len(table.X):,} rows)")
    else:
        print(f"RMSE {metrics['rmse']:.6g}   (R^2 {metrics['r2']:.4f}; {len(table.X):,} rows)")
    return 0


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
    p.add_argument("--norm", choices=NORMS, default=None,
                   help="plan `ckpt train --norm`'s network: layer or batch normalisation "
                        "after each hidden layer (with --residual, its blocks' norm)")
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
    if args.norm is not None and args.widths:
        raise UsageError("--norm plans build_mlp's network: give --depth and --width, not "
                         "--widths")
    if args.residual or args.norm is not None:
        chain = mlp_costs(args.width, args.depth, args.width, args.width, residual=args.residual,
                          norm=args.norm, dropout=args.dropout)
    else:
        chain = dense_chain(args.widths or [args.width] * (args.depth + 1))
    widths = list(chain.widths)
    dtype = np.dtype(args.dtype)
    budget = args.budget
    if budget is None:
        budget = uniform_plan(chain, args.batch_size, max(1, math.isqrt(len(chain))),
                              dtype).peak_bytes
    chosen = plan(chain, args.batch_size, budget, dtype, method=args.method)
    print(chosen.explain())
    curve = tradeoff(chain, args.batch_size, dtype, points=args.points, method=args.method)
    step_flops = chain.step_flops() * args.batch_size
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
SUBCOMMANDS: List[Callable[[argparse._SubParsersAction], None]] = [
    add_train_command, add_predict_command, add_evaluate_command, add_plan_command]


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
    except BrokenPipeError:
        # The reader of our output left (`ckpt predict ... | head`): stop without a word.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except KeyboardInterrupt as exc:
        # Ctrl-C: one line saying what was done, and the shell's status for SIGINT.
        print(f"ckpt {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError, MemoryError) as exc:
        # Bad data, files or sizes: one line, no traceback, usage-error status.
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ckpt {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
