"""Resumable training: the state of a run, written atomically to a folder, and read back.

``fit(..., run_state=StateFolder(path))`` writes a :class:`RunState` at the end of every epoch
(and every ``every_steps`` optimizer steps): the parameters, the optimizer's state, the
generator that shuffles the rows and the model's step-seed generator (which keys the Dropout
masks), the current epoch's order of the rows, the epoch and step, the history and the running
sums of the epoch in progress, and the early-stopping bookkeeping. A run started again with
``StateFolder(path, resume=True)`` continues from the newest readable state and computes the
same bits as a run that was never stopped -- given the same threads and threading mode, which
the front end (``ckpt train``) records in :attr:`RunState.info` and restores.

Files are ``state-<epoch>-<step>.npz`` (the epoch counts completed epochs, the step the
optimizer steps of the whole run), written as a temporary file, synced and renamed (see
:func:`ckpt.io.write_npz`), each with a CRC-32 of its contents; a file that is truncated,
corrupt or fails its CRC is skipped for the one before it. The newest ``keep`` (default 2)
are kept.

Test seam: with the environment variable ``CKPT_STATE_WRITE_HALT=N`` the N-th state write of
the process stops halfway through its temporary file and the process kills itself (SIGKILL),
as a crash in the middle of a write would.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

STATE_FORMAT = 1
HALT_VARIABLE = "CKPT_STATE_WRITE_HALT"
_NAME = re.compile(r"^state-(\d+)-(\d+)\.npz$")
_META = "state_meta"


class StateError(ValueError):
    """A state folder that cannot be resumed from; the message says why."""


@dataclass
class RunState:
    """Everything a run needs to continue where it stopped.

    ``epoch``: epochs completed; ``step``: optimizer steps done in epoch ``epoch + 1`` (0 at an
    epoch's end); ``steps_done``: optimizer steps of the whole run. ``order`` is epoch
    ``epoch + 1``'s order of the rows when the state is from within it (else None), and
    ``rng_state`` the shuffling generator's state after that order was drawn. ``sums`` holds
    the epoch in progress' (loss sum, correct, rows seen). ``best`` is early stopping's (lowest
    val_loss, its epoch) and ``best_params`` that epoch's parameters; ``stopped`` says early
    stopping ended the run. ``info`` is the front end's: the arguments and threads of the run.
    ``buffers`` holds, for each layer with buffers (BatchNorm's running statistics and count),
    their values, and ``best_buffers`` those of the best epoch.
    """

    epoch: int
    step: int
    steps_done: int
    params: List[np.ndarray]
    optimizer: Dict[str, Any]
    rng_state: Dict[str, Any]
    step_seed_state: Optional[Dict[str, Any]]
    order: Optional[np.ndarray]
    sums: Tuple[float, int, int]
    history: Dict[str, List[float]]
    best: Optional[Tuple[float, int]] = None
    best_params: Optional[List[np.ndarray]] = None
    stopped: bool = False
    info: Dict[str, Any] = field(default_factory=dict)
    buffers: List[Dict[str, Any]] = field(default_factory=list)   # per layer that has any
    best_buffers: Optional[List[Dict[str, Any]]] = None

    def arrays(self) -> Dict[str, np.ndarray]:
        """The state as the arrays of one .npz (one of them the JSON of the rest)."""
        arrays: Dict[str, np.ndarray] = {f"param_{i}": p for i, p in enumerate(self.params)}
        buffers = self.optimizer["buffers"]
        for name, values in buffers.items():
            arrays.update({f"opt_{name}_{i}": v for i, v in enumerate(values)})
        if self.order is not None:
            arrays["order"] = np.asarray(self.order, np.int64)
        for i, p in enumerate(self.best_params or []):
            arrays[f"best_{i}"] = p
        scalars = []
        for prefix, layers in (("buffer", self.buffers), ("best_buffer", self.best_buffers)):
            record = []
            for i, values in enumerate(layers or []):
                counts = {}
                for name, value in values.items():
                    if isinstance(value, np.ndarray):
                        arrays[f"{prefix}_{i}_{name}"] = value
                    else:
                        counts[name] = value
                record.append({"arrays": sorted(n for n, v in values.items()
                                                if isinstance(v, np.ndarray)),
                               "counts": counts})
            scalars.append(record if layers is not None else None)
        meta = {
            "format": STATE_FORMAT, "epoch": self.epoch, "step": self.step,
            "steps_done": self.steps_done, "params": len(self.params),
            "optimizer": {key: self.optimizer[key] for key in ("type", "hyperparameters", "step")},
            "buffers": {name: len(values) for name, values in buffers.items()},
            "rng_state": self.rng_state, "step_seed_state": self.step_seed_state,
            "sums": list(self.sums), "history": self.history,
            "best": list(self.best) if self.best is not None else None,
            "stopped": self.stopped, "info": self.info,
            "layer_buffers": scalars[0], "best_layer_buffers": scalars[1],
        }
        meta["crc"] = _crc(arrays)
        arrays[_META] = np.array(json.dumps(meta))
        return arrays

    @classmethod
    def from_file(cls, path: str) -> "RunState":
        """Read and check a state file; StateError says what is wrong with it."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise StateError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
        try:
            meta = json.loads(str(arrays.pop(_META)))
        except (KeyError, ValueError) as exc:
            raise StateError(f"{path} has no readable metadata ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise StateError(f"{path} is not a ckpt state of format {STATE_FORMAT}")
        if meta.get("crc") != _crc(arrays):
            raise StateError(f"{path} fails its checksum")
        count = meta["params"]
        buffers = {name: [arrays[f"opt_{name}_{i}"] for i in range(n)]
                   for name, n in meta["buffers"].items()}
        best_params = [arrays[f"best_{i}"] for i in range(count)] if "best_0" in arrays \
            else None

        def layer_buffers(prefix: str,
                          record: Optional[list]) -> Optional[List[Dict[str, Any]]]:
            if record is None:
                return None
            return [{**{name: arrays[f"{prefix}_{i}_{name}"] for name in layer["arrays"]},
                     **layer["counts"]} for i, layer in enumerate(record)]
        return cls(meta["epoch"], meta["step"], meta["steps_done"],
                   [arrays[f"param_{i}"] for i in range(count)],
                   {**meta["optimizer"], "buffers": buffers}, meta["rng_state"],
                   meta["step_seed_state"], arrays.get("order"), tuple(meta["sums"]),
                   meta["history"], tuple(meta["best"]) if meta["best"] is not None else None,
                   best_params, bool(meta["stopped"]), meta["info"],
                   layer_buffers("buffer", meta["layer_buffers"]) or [],
                   layer_buffers("best_buffer", meta["best_layer_buffers"]))


def _crc(arrays: Dict[str, np.ndarray]) -> int:
    crc = 0
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        crc = zlib.crc32(f"{key}:{value.dtype.str}:{value.shape}".encode(), crc)
        crc = zlib.crc32(memoryview(value).cast("B"), crc)
    return crc


class StateFolder:
    """A folder of a run's states: ``fit`` writes through :meth:`write` and resumes from
    :attr:`resume_from`.

    ``every_steps``: also write a state every that many optimizer steps (the end of each epoch
    always writes one). ``resume=True``: read the newest readable state (:attr:`resume_from`;
    :attr:`skipped` lists the files passed over and why); StateError when there is none.
    ``info`` is stored in every state written. ``writer``: only this process writes (one rank
    of several reads the same folder without writing). The folder is created at the first
    write; opening one that already holds states without ``resume`` is a StateError.
    """

    def __init__(self, path: "os.PathLike[str] | str", *, every_steps: Optional[int] = None,
                 resume: bool = False, keep: int = 2, info: Optional[Dict[str, Any]] = None,
                 writer: bool = True) -> None:
        self.path = os.fspath(path)
        if every_steps is not None and (isinstance(every_steps, bool)
                                        or not isinstance(every_steps, int) or every_steps < 1):
            raise ValueError(f"every_steps must be a positive integer, got {every_steps!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive integer, got {keep!r}")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise NotADirectoryError(f"{self.path} exists and is not a folder")
        self.every_steps = every_steps
        self.keep = keep
        self.info = dict(info or {})
        self.writer = writer
        self.writes = 0
        self.skipped: List[str] = []
        self._unreadable: List[str] = []
        self.resume_from: Optional[RunState] = None
        if resume:
            self.resume_from = self._newest()
        elif writer:
            if self.files():
                raise StateError(f"{self.path} already holds the states of a run: resume it "
                                 f"(--resume {self.path}) or choose another folder")
            parent = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(self.path) and not os.path.isdir(parent):
                raise FileNotFoundError(errno.ENOENT, "its parent folder does not exist",
                                        self.path)
            if not os.access(self.path if os.path.isdir(self.path) else parent, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), self.path)

    def files(self) -> List[str]:
        """The state files, oldest first."""
        if not os.path.isdir(self.path):
            return []
        found = []
        for name in os.listdir(self.path):
            match = _NAME.match(name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), name))
        return [os.path.join(self.path, name) for _, _, name in sorted(found)]

    def _newest(self) -> RunState:
        files = self.files()
        if not files:
            raise StateError(f"{self.path} holds no training state to resume from")
        for path in reversed(files):
            try:
                return RunState.from_file(path)
            except StateError as exc:
                self.skipped.append(str(exc))
                self._unreadable.append(path)
        raise StateError(f"no readable state in {self.path}: {'; '.join(self.skipped)}")

    def write(self, state: RunState) -> None:
        """Write ``state`` atomically (with :attr:`info`), then keep only the newest files."""
        if not self.writer:
            return
        from ckpt.io import write_npz
        state.info = self.info
        self.writes += 1
        os.makedirs(self.path, exist_ok=True)   # at the first write: bad input leaves nothing
        name = os.path.join(self.path, f"state-{state.epoch:06d}-{state.steps_done:09d}.npz")
        halt = os.environ.get(HALT_VARIABLE)
        write_npz(name, state.arrays(),
                  halfway=_kill_self if halt is not None and halt == str(self.writes) else None)
        # Unreadable states newer than the one resumed from are set aside, not counted.
        for path in self._unreadable:
            if os.path.exists(path):
                os.replace(path, path + ".unreadable")
        self._unreadable = []
        for old in self.files()[:-self.keep]:
            try:
                os.unlink(old)
            except FileNotFoundError:
                pass


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
