"""A training run for tests/test_distributed.py, started with or without ``mpiexec -n K``.

    python tests/mpi_worker.py train OUT.npz --optimizer adam --batch-size 16 [--data F.npz]
    mpiexec -n 2 python tests/mpi_worker.py train OUT.npz --optimizer adam --batch-size 8 ...
    mpiexec -n 2 python tests/mpi_worker.py fail {raise,kill,diverge,rows} --rank 1 --step 3

``train`` fits a small float64 MLP (shuffled, validation each epoch) and rank 0 writes the final
parameters and the history to OUT.npz. ``fail`` makes one rank raise, SIGKILL itself, or nudge a weight (which the replicas'
checksum must catch) mid-run, or gives it one row less than the others.
"""
import argparse
import contextlib
import os
import signal
import sys

import numpy as np

from ckpt import SGD, Adam, build_mlp, fit
from ckpt.checkpoint import SegmentCheckpointer
from ckpt import distributed

ROWS, FEATURES, CLASSES = 97, 6, 3


def make_data(rows=ROWS):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((rows, FEATURES))
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    return X, y


def make_model(optimizer, norm=None):
    # Dropout on: every rank draws the same step seed, and masks are keyed by the global row.
    model = SegmentCheckpointer(build_mlp(FEATURES, 3, 12, CLASSES, "tanh", np.float64, seed=1,
                                          dropout=0.25, norm=norm),
                                checkpoint_every=2, seed=3)
    opt = (SGD(model, 0.1, momentum=0.9) if optimizer == "sgd" else Adam(model, 0.01))
    return model, opt


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("out")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data", help="an uncompressed .npz with X and y, memory-mapped")
    p.add_argument("--accumulation-steps", type=int, default=1)
    p.add_argument("--rows", type=int, default=ROWS)
    p.add_argument("--norm", choices=["layer", "batch"], default=None)
    p.add_argument("--sync-batchnorm", action="store_true")
    f = sub.add_parser("fail")
    f.add_argument("how", choices=["raise", "kill", "diverge", "rows"])
    f.add_argument("--rank", type=int, default=1)
    f.add_argument("--step", type=int, default=3)
    args = parser.parse_args(argv)

    world = distributed.detect_world()
    comm = distributed.world_comm() if world is not None and world.size > 1 else None
    rank = comm.Get_rank() if comm is not None else 0
    model, opt = make_model(getattr(args, "optimizer", "adam"), getattr(args, "norm", None))
    if rank != 0:
        # Other weights and optimizer state on the other ranks (as if only rank 0 had loaded a
        # saved model): the start-up broadcast must replace them.
        for p in model.params():
            p += 1.0
        state = opt.state_dict()
        state["step"] = 5
        for buffers in state["buffers"].values():
            for b in buffers:
                b += 1.0
        opt.load_state_dict(state)
    if args.command == "train" and args.data:
        arrays = distributed.open_rows(args.data)
        X, y = arrays["X"], arrays["y"]
    else:
        X, y = make_data(getattr(args, "rows", ROWS))
    if args.command == "fail" and args.how == "rows" and rank == args.rank:
        X, y = X[:-1], y[:-1]   # a rank given another data set than the others
    with distributed.abort_on_error(comm, "mpi_worker") if comm is not None else contextlib.nullcontext():
        if args.command == "train":
            history = fit(model, X, y, optimizer=opt, epochs=args.epochs,
                          batch_size=args.batch_size, seed=7, comm=comm,
                          accumulation_steps=args.accumulation_steps,
                          validation_data=make_data(31), sync_batchnorm=args.sync_batchnorm)
            # Rank 0 writes OUT; with BatchNorm every rank writes OUT.rank<r>.npz (buffers too).
            norms = [layer for layer in model.layers if hasattr(layer, "running_var")]
            buffers = {f"norm{i}_{name}": np.asarray(value) for i, layer in enumerate(norms)
                       for name, value in layer.buffers().items()}
            if rank == 0:
                np.savez(args.out, *model.params(), **buffers,
                         **{f"history_{key}": np.array(value) for key, value in history.items()})
            if norms:
                np.savez(f"{args.out}.rank{rank}.npz", *model.params(), **buffers)
        else:
            def step_callback(info):
                if rank == args.rank and info["step"] == args.step:
                    if args.how == "raise":
                        raise ValueError(f"bad data shard at step {info['step']}")
                    if args.how == "diverge":
                        model.params()[0][0, 0] += 1e-3
                    else:
                        os.kill(os.getpid(), signal.SIGKILL)
            fit(model, X, y, optimizer=opt, epochs=1000, batch_size=4, seed=7, comm=comm,
                step_callback=step_callback)
    return 0


if __name__ == "__main__":
    sys.exit(main())
