"""Data-parallel training across processes and machines with MPI (mpi4py).

Every rank holds a replica of the model. Each training step:

1. The epoch's permutation of the rows (drawn from the same generator state on every rank) is cut
   into *global* batches of ``size * batch_size`` rows; rank r takes the r-th contiguous slice
   of each global batch (:func:`shard_batches`). The union of the slices is exactly the batch a
   single process would train on with batch ``size * batch_size``: no padding, no row repeated.
   A short last batch is split as evenly as it goes, so a rank may get few or no rows.
2. Each rank runs forward and backward on its slice; its gradients are the mean over its rows.
3. One allreduce over a flat buffer sums ``gradient * rows / global_rows`` over the ranks: the
   mean over the global batch, which is what one process computes (to float rounding).
4. Every rank runs the same optimizer step on the same gradients, so the replicas stay identical
   (checked every ``check_every`` steps with a parameter checksum).

``fit(..., comm=comm)`` in :mod:`ckpt.train` uses this module (``evaluate(..., comm=comm)``
gathers its sums over the ranks itself, in :mod:`ckpt.inference`);
``mpiexec -n K ckpt train`` sets it up from the launcher's environment. A script run under
mpiexec should train inside ``with abort_on_error(comm):``, so that an exception on one rank
ends the job instead of leaving the other ranks waiting in the next allreduce.

mpi4py is imported only when a communicator is needed: ``pip install 'ckpt-cpu[mpi]'`` brings
mpi4py and MPICH (whose ``mpiexec`` lands next to the Python executable).

A rank's slice starts at its row offset within the step's global batch; a model whose
``forward`` accepts ``row_offset=`` receives it, so that per-row randomness (dropout masks keyed
by the row's position in the global batch) matches single-process training.

Overlap of the allreduce with the backward pass, as PyTorch DDP does it, is not implemented: the
backward of a Dense chain is one compiled call that returns when every gradient is ready, so
there is no point at which some layers' gradients could be sent while others are computed. See
``bench/mpi_scaling.py`` for what the allreduce costs against the step.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from ckpt.datasets import open_rows  # noqa: F401 (ckpt.distributed.open_rows, as before)
from ckpt.layers import BatchNorm, check_size, walk
from ckpt.optim import Optimizer, collect_parameters

INSTALL_HINT = "pip install 'ckpt-cpu[mpi]'"

# Launcher variables, (size, rank, local size, local rank), in the order they are trusted:
# Open MPI / PMIx, MPICH's Hydra (and Intel MPI), MVAPICH.
_LAUNCHERS = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS", "MPI_LOCALRANKID"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_SIZE",
     "MV2_COMM_WORLD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class World:
    """The MPI world this process was launched in, read from the launcher's environment."""

    size: int
    rank: int
    local_size: Optional[int]   # ranks on this node, when the launcher says
    local_rank: Optional[int]


def detect_world(environ: Optional[Mapping[str, str]] = None) -> Optional[World]:
    """The world an MPI launcher (mpiexec, mpirun) started this process in, or None.

    Reads only environment variables, so it works before (and without) importing mpi4py.
    """
    env = os.environ if environ is None else environ
    for size_var, rank_var, local_size_var, local_rank_var in _LAUNCHERS:
        if size_var in env and rank_var in env:
            size, rank = _env_int(env, size_var), _env_int(env, rank_var)
            if size is None or rank is None or size < 1 or not 0 <= rank < size:
                continue
            return World(size, rank, _env_int(env, local_size_var), _env_int(env, local_rank_var))
    return None


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def import_mpi():
    """The ``mpi4py.MPI`` module; ImportError naming the extra to install if it is missing."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"data-parallel training needs mpi4py and an MPI library: "
                          f"{INSTALL_HINT} ({exc})") from exc
    return MPI


def world_comm():
    """MPI.COMM_WORLD (initialises MPI)."""
    return import_mpi().COMM_WORLD


def default_threads(world: World, cores: Optional[int] = None) -> int:
    """BLAS threads per rank: this node's cores divided by the ranks on it (at least 1)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    local = world.local_size or world.size
    return max(1, cores // local)


# ------------------------------------------------------------------------------------ sharding

def shard_batches(order: np.ndarray, batch_size: int, size: int = 1,
                  rank: int = 0) -> List[Tuple[np.ndarray, int, int]]:
    """Rank ``rank``'s share of each global batch of ``order``: (rows, row_offset, global_rows).

    ``order`` (an epoch's permutation, the same on every rank) is cut into global batches of
    ``size * batch_size`` rows; of a batch of g rows, rank r takes positions
    ``[r*g // size, (r+1)*g // size)``, which is ``[r*batch_size, (r+1)*batch_size)`` for a full
    batch. ``row_offset`` is the slice's start within the global batch. With size=1 this is the
    plain single-process batching.
    """
    batch_size = check_size(batch_size, "batch_size")
    size = check_size(size, "size")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < size:
        raise ValueError(f"rank must be an integer in [0, {size}), got {rank!r}")
    step = size * batch_size
    batches = []
    for start in range(0, len(order), step):
        rows = min(step, len(order) - start)
        lo, hi = rank * rows // size, (rank + 1) * rows // size
        batches.append((order[start + lo:start + hi], lo, rows))
    return batches


# ------------------------------------------------------------------------------------ failures

# How long a failing rank waits, after writing its message, before aborting the job.
ABORT_GRACE_SECONDS = 0.5


@contextlib.contextmanager
def abort_on_error(comm: Any, prog: str = "ckpt") -> Iterator[None]:
    """Turn an exception on any rank into one message naming the rank and an MPI Abort.

    Without it, a rank that raises leaves the others waiting in their next collective for ever.
    The message goes to stderr, then ``comm.Abort`` ends every rank of the job (status 2 for
    ValueError/OSError, the CLI's usage-error status, else 1). A one-rank world just re-raises.
    """
    try:
        yield
    except BaseException as exc:   # noqa: B902 - KeyboardInterrupt must abort the others too
        if comm.Get_size() == 1 or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (ValueError, OSError, SystemExit)):
            traceback.print_exc(file=sys.stderr)
            message = f"{type(exc).__name__}: {message}"
        sys.stdout.flush()
        print(f"{prog}: error on rank {comm.Get_rank()} of {comm.Get_size()}: {message}; "
              f"aborting all ranks", file=sys.stderr, flush=True)
        # The launcher forwards a rank's stderr asynchronously, and Abort kills the forwarder
        # too: without a moment's grace the message was lost (once in a few clean-clone runs).
        time.sleep(ABORT_GRACE_SECONDS)
        status = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else \
            2 if isinstance(exc, (ValueError, OSError)) else 1
        comm.Abort(status)


# ------------------------------------------------------------------------------------ training

class DataParallel:
    """One replica of a data-parallel model on communicator ``comm``.

    Built on every rank at the start of training (collectively: every rank must build it):
    rank 0's parameters, optimizer state and generator state are broadcast, so every replica
    starts identical and draws the same permutations. Then, each step, :meth:`shard` gives the
    rank its rows and :meth:`allreduce_gradients` averages the gradients (weighted by rows)
    before the optimizer step. The flat allreduce buffer holds one more copy of the gradients
    (the parameters' size); packing into it is faster than one allreduce per parameter, whose
    latency adds up on deep chains.

    BatchNorm layers: by default each rank normalises with its own batch's statistics, and
    rank 0's running statistics (and counts) are copied to every rank after each step, as
    PyTorch DDP's ``broadcast_buffers=True`` does, so the replicas never diverge. With
    ``sync_batchnorm=True`` their statistics are the global batch's instead (each BatchNorm's
    forward and backward sums are allreduced until :meth:`release`).
    """

    def __init__(self, comm: Any, model: Any, optimizer: Optional[Optimizer] = None, *,
                 rng: Optional[np.random.Generator] = None, n_rows: Optional[int] = None,
                 check_every: int = 100, sync_batchnorm: bool = False) -> None:
        for method in ("Get_size", "Get_rank", "Allreduce", "Bcast", "bcast", "allgather"):
            if not callable(getattr(comm, method, None)):
                raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.check_every = check_size(check_every, "check_every")
        self.steps = 0
        self._params, self._grads = collect_parameters(model)
        dtypes = {g.dtype for g in self._grads}
        if len(dtypes) != 1:
            raise TypeError(f"data-parallel training needs one parameter dtype, got "
                            f"{sorted(map(str, dtypes))}")
        self._dtype = dtypes.pop()
        self._offsets = np.cumsum([0] + [g.size for g in self._grads])
        # Gradients, then the step's loss sum and correct count: one allreduce per step.
        self._buffer = np.empty(int(self._offsets[-1]) + 2, self._dtype)
        self._check_same("parameters", [f"{p.dtype}{list(p.shape)}" for p in self._params])
        if n_rows is not None:
            self._check_same("number of rows", n_rows,
                             "every rank must pass the whole data set (each reads only its "
                             "rows)")
        layers = model if isinstance(model, (list, tuple)) else getattr(model, "layers", [])
        self._norms = [layer for layer in walk(layers) if isinstance(layer, BatchNorm)]
        self._norm_buffer = np.empty(sum(2 * b.features + 1 for b in self._norms), np.float64)
        self.broadcast(optimizer, rng)
        self.sync_batchnorm = bool(sync_batchnorm)
        if self.sync_batchnorm:
            for norm in self._norms:
                norm._sync = comm

    def release(self) -> None:
        """Stop synchronising BatchNorm statistics (the end of training)."""
        for norm in self._norms:
            norm._sync = None

    def broadcast_buffers(self) -> None:
        """Copy rank 0's BatchNorm running statistics and counts to every rank (one
        broadcast, packed)."""
        if not self._norms or self.size == 1:
            return
        buf, at = self._norm_buffer, 0
        for norm in self._norms:
            f = norm.features
            buf[at:at + f], buf[at + f:at + 2 * f] = norm.running_mean, norm.running_var
            buf[at + 2 * f] = norm.num_batches_tracked
            at += 2 * f + 1
        self.comm.Bcast(buf, root=0)
        at = 0
        for norm in self._norms:
            f = norm.features
            norm.running_mean[...], norm.running_var[...] = buf[at:at + f], buf[at + f:at + 2 * f]
            norm.num_batches_tracked = int(buf[at + 2 * f])
            at += 2 * f + 1

    def _check_same(self, what: str, value: Any, hint: str = "") -> None:
        values = self.comm.allgather(value)
        if any(v != values[0] for v in values):
            raise ValueError(f"the ranks disagree on the {what}: "
                             f"{', '.join(f'rank {r}: {v}' for r, v in enumerate(values))}"
                             + (f"; {hint}" if hint else ""))

    def broadcast(self, optimizer: Optional[Optimizer] = None,
                  rng: Optional[np.random.Generator] = None) -> None:
        """Copy rank 0's parameters (optimizer state, generator state) to every rank."""
        for p in self._params:
            self.comm.Bcast(p, root=0)
        if optimizer is not None:
            state = optimizer.state_dict()
            for buffers in state["buffers"].values():
                for b in buffers:
                    self.comm.Bcast(b, root=0)
            meta = self.comm.bcast({key: state[key] for key in ("type", "hyperparameters",
                                                               "step")}, root=0)
            state.update(meta)
            optimizer.load_state_dict(state)
        if rng is not None:
            rng.bit_generator.state = self.comm.bcast(rng.bit_generator.state, root=0)
        self.broadcast_buffers()

    def shard(self, order: np.ndarray, batch_size: int) -> List[Tuple[np.ndarray, int, int]]:
        """This rank's (rows, row_offset, global_rows) for each step of an epoch."""
        return shard_batches(order, batch_size, self.size, self.rank)

    def allreduce_gradients(self, rows: int, global_rows: int, loss_sum: float,
                            correct: int) -> Tuple[float, int]:
        """Replace each gradient by the global-batch mean; returns the step's global
        (loss sum, correct count).

        ``rows`` of the step's ``global_rows`` were this rank's, and its gradients are the mean
        over them (zero when it had none).
        """
        self.steps += 1
        if self.size == 1:
            return loss_sum, correct
        buf = self._buffer
        weight = rows / global_rows
        for g, start, stop in zip(self._grads, self._offsets[:-1], self._offsets[1:]):
            np.multiply(g.reshape(-1), weight, out=buf[start:stop])
        buf[-2] = loss_sum
        buf[-1] = correct
        self.comm.Allreduce(_in_place(), buf)
        for g, start, stop in zip(self._grads, self._offsets[:-1], self._offsets[1:]):
            g.reshape(-1)[...] = buf[start:stop]
        self.broadcast_buffers()
        if self.steps % self.check_every == 0:
            self.check_replicas()
        return float(buf[-2]), int(round(float(buf[-1])))

    def checksum(self) -> int:
        """CRC-32 of this replica's parameter bytes."""
        crc = 0
        for p in self._params:
            crc = zlib.crc32(memoryview(np.ascontiguousarray(p)).cast("B"), crc)
        return crc

    def check_replicas(self) -> None:
        """RuntimeError on every rank if the replicas' parameters are not bit-identical."""
        sums = self.comm.allgather(self.checksum())
        if len(set(sums)) > 1:
            raise RuntimeError(f"the replicas diverged by step {self.steps}: parameter "
                               f"checksums {', '.join(f'rank {r}: {s:#010x}' for r, s in enumerate(sums))}")


def _in_place():
    return import_mpi().IN_PLACE
