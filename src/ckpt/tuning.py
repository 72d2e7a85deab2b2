"""Choosing a chain's threads by measurement: the ``"tuned"`` and ``"auto"`` modes.

A :class:`ThreadsTuner` belongs to one SegmentCheckpointer and keeps a choice per (batch size,
T, mode), T being :func:`ckpt.threads.requested_num_threads`. For a new batch size:

1. **Verify** (the first training step). The step runs as the reference configuration would,
   OpenBLAS at T threads without a split, so its results are those of ``"blas"``. After its
   backward, every other OpenBLAS candidate (1 .. T threads) reruns the same step -- same batch,
   weights, step seed, output gradient -- and is kept only if its output, its input gradient and
   every parameter gradient (the bias sums included) are bit-equal to the reference's; the
   parameter gradients are then put back. These reruns also warm the candidates up (OpenBLAS
   starts its threads). Split candidates (``"auto"`` only) are not held to bit-equality -- their
   summation order differs -- but one whose gradient copies do not fit the checkpointer's budget
   is dropped.
2. **Measure** the next training steps: the kept candidates take turns, one step each, for
   :data:`ROUNDS` rounds (A B C A B C A B C); a step's time is its forward plus its backward
   phase. After each round, a candidate whose mean so far is more than :data:`PRUNE` times the
   best one's runs no more rounds: on the loaded 2-core machine a step of ``ckpt train``'s model
   took 0.5 ms at one thread and up to 90 ms at two (OpenBLAS's second thread waiting for a
   core at each GEMM), and measuring that three times cost more than the rest of the epoch.
3. **Choose** the candidate of least mean time (ties: the earlier, fewer threads) and run every
   later step of that batch size with it. The mean, not the median: on a loaded machine OpenBLAS
   at two threads was bimodal on small steps (0.5 or 10 ms), and a median of three missed the
   slow mode that the run then paid at every step (``ckpt train``: 8-22 s at two threads against
   0.6-2 s at one).
4. **Watch** the chosen candidate: its steps stay timed, and when the mean of its last
   :data:`WATCH` steps exceeds :data:`PRUNE` times the best mean measured, the load has changed
   (another process took the cores a choice relied on): the candidates are measured again.
   Each new measurement doubles the steps watched before the next, so that a load that comes
   and goes costs a measurement per doubling of the run, not one every WATCH steps.

A smaller batch size than one already chosen for (the partial last batch of an epoch) inherits
that choice instead of being measured: its first step runs the reference and checks the inherited
candidate on it, bit for bit as above (the reference stays if it differs). Evaluation-mode
forwards use the choice of their batch size when there is one, else the reference.

Above 8 threads the OpenBLAS candidates are 1, 2, 4, ... and T (not every count up to T), so that
measuring at T = 64 takes 3 x 8 steps rather than 3 x 64.
"""
from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ckpt.threads import hold_blas_threads, release_blas_threads

ROUNDS = 3           # timed steps of each candidate
PRUNE = 2.0          # a candidate this many times slower than the best after a round is dropped
WATCH = 20           # steps of the chosen candidate whose mean is watched
ALL_COUNTS_UP_TO = 8


@dataclass(frozen=True)
class Config:
    """How a step uses the cores: OpenBLAS at ``threads`` threads, and ``slices`` batch slices
    (1: OpenBLAS threading; more: the batch split on ckpt's pool, single-threaded BLAS)."""

    threads: int
    slices: int = 1

    @property
    def label(self) -> str:
        return f"blas/{self.threads}" if self.slices == 1 else f"split/{self.slices}"


def thread_counts(T: int) -> List[int]:
    """The OpenBLAS thread counts tried at T: 1 .. T up to 8, then powers of two and T."""
    if T <= ALL_COUNTS_UP_TO:
        return list(range(1, T + 1))
    counts = {T}
    n = 1
    while n < T:
        counts.add(n)
        n *= 2
    return sorted(counts)


def candidates(mode: str, T: int, batch: int) -> List[Config]:
    """The configurations a mode measures: OpenBLAS at each count (the reference, T, first),
    then, for "auto", the batch split into each count of slices that a batch this size gives."""
    blas = [Config(T)] + [Config(t) for t in thread_counts(T) if t != T]
    if mode != "auto":
        return blas
    split = sorted({min(t, batch) for t in thread_counts(T)} - {1})
    return blas + [Config(T, s) for s in split]


class _Tuning:
    """One batch size's measurement: what is left to run, what it measured, what it chose."""

    def __init__(self, reference: Config, inherited: Optional[Config] = None) -> None:
        self.reference = reference
        self.inherited = inherited     # the choice of a larger batch size, checked not measured
        self.kept: List[Config] = []
        self.excluded: Dict[Config, str] = {}
        self.samples: Dict[Config, List[float]] = {}
        self.queue: List[Config] = []       # the rest of the current round
        self.rounds = 0                      # rounds begun
        self.recent: List[float] = []        # the chosen candidate's last steps (seconds)
        self.remeasured = 0                  # times the watch started a new measurement
        self.verified = False
        self.chosen: Optional[Config] = None

    def current(self) -> Config:
        if self.chosen is not None:
            return self.chosen
        return self.queue[0] if self.queue else self.reference

    def report(self) -> dict:
        return {
            "chosen": None if self.chosen is None else self.chosen.label,
            "threads": None if self.chosen is None else self.chosen.threads,
            "slices": None if self.chosen is None else self.chosen.slices,
            "measured": bool(self.samples),
            "remeasured": self.remeasured,
            "inherited": self.inherited is not None,
            "candidates": [c.label for c in self.kept],
            "excluded": {c.label: why for c, why in self.excluded.items()},
            "seconds": {c.label: list(s) for c, s in self.samples.items()},
        }


@dataclass
class _Pending:
    """The tuner's record of a pending training step."""

    key: Tuple[int, int, str]
    config: Config
    row_offset: int
    training: bool
    seconds: float = 0.0


class ThreadsTuner:
    """Measures and keeps the configuration of each batch size of one chain (see the module).

    ``timing(config, seconds)`` turns a step's measured seconds into the value recorded for its
    candidate; the default keeps them. Tests replace it to choose without timing anything.
    """

    def __init__(self) -> None:
        self._tunings: Dict[Tuple[int, int, str], _Tuning] = {}
        self._pending: Optional[_Pending] = None
        self.timing: Callable[[Config, float], float] = lambda config, seconds: seconds

    def clear(self) -> None:
        """Forget every choice (the chain changed)."""
        self._tunings.clear()
        self._pending = None

    # ------------------------------------------------------------ what a step runs
    def config(self, batch: int, T: int, mode: str) -> Config:
        """The configuration the next step of this batch size runs (nothing changes)."""
        tuning = self._tunings.get((batch, T, mode))
        return tuning.current() if tuning is not None else Config(T)

    def begin(self, batch: int, T: int, mode: str, training: bool, row_offset: int,
              fits: Callable[[Config], bool]) -> Config:
        """Start a step: the configuration it runs; a training step of a new batch size starts
        its measurement (or its inheritance). ``fits(config)``: whether a candidate's memory
        fits the checkpointer's budget."""
        key = (batch, T, mode)
        tuning = self._tunings.get(key)
        if tuning is None and training:
            tuning = self._new_tuning(key, fits)
            if tuning is not None:
                self._tunings[key] = tuning
        self._pending = None
        if tuning is None:
            return Config(T)
        config = tuning.current()
        if training:
            self._pending = _Pending(key, config, row_offset, training)
        return config

    def _new_tuning(self, key: Tuple[int, int, str],
                    fits: Callable[[Config], bool]) -> Optional[_Tuning]:
        """The measurement of a new batch size; None while a larger one is still measuring
        (this batch is run as the reference, and decided once that one has chosen)."""
        batch, T, mode = key
        reference = Config(T)
        larger = [(b, t.chosen) for (b, t_, m), t in self._tunings.items()
                  if t_ == T and m == mode and b > batch]
        if larger:
            if any(chosen is None for _, chosen in larger):
                return None
            inherited = min(larger)[1]
            if inherited.slices > 1:
                inherited = Config(T, min(inherited.slices, batch))
            tuning = _Tuning(reference, inherited)
            if inherited.slices > 1 and fits(inherited):
                tuning.chosen, tuning.verified = inherited, True
            elif inherited == reference or inherited.slices > 1:
                tuning.chosen, tuning.verified = reference, True
            else:
                tuning.kept = [inherited]
            return tuning
        tuning = _Tuning(reference)
        for config in candidates(mode, T, batch)[1:]:
            if config.slices > 1 and not fits(config):
                tuning.excluded[config] = "its gradient copies do not fit the budget"
            else:
                tuning.kept.append(config)
        if not tuning.kept:
            tuning.chosen, tuning.verified = reference, True
        return tuning

    def needs_verification(self) -> bool:
        """Whether the pending step is its batch size's first (the candidates rerun it)."""
        pending = self._pending
        return pending is not None and not self._tunings[pending.key].verified

    def pending_config(self) -> Optional[Config]:
        return None if self._pending is None else self._pending.config

    def add_seconds(self, seconds: float) -> None:
        if self._pending is not None:
            self._pending.seconds += seconds

    def drop(self) -> None:
        """The pending step ended without a backward: nothing is recorded."""
        self._pending = None

    # ------------------------------------------------------------ after a backward
    def verify(self, rerun: Callable[[Config], tuple], reference: Optional[tuple]) -> None:
        """Keep the candidates whose rerun of the pending step gives the reference's bits.

        ``rerun(config)`` runs the step again in that configuration, setting the parameter
        gradients, and returns its arrays (output, input gradient, parameter gradients);
        ``reference`` is the same of the step as run, when it set the gradients -- the arrays
        then end holding the reference's values again -- or None after a step that
        accumulated: the reference configuration is rerun for them (the caller restores).
        Arrays are compared by digest, so no copy of them is kept.
        """
        tuning = self._tunings[self._pending.key]
        want = _digests(reference if reference is not None else rerun(tuning.reference))
        holds_reference = True
        kept = []
        for config in tuning.kept:
            if config.slices > 1:
                kept.append(config)
                continue
            holds_reference = _digests(rerun(config)) == want
            if holds_reference:
                kept.append(config)
            else:
                tuning.excluded[config] = "not bit-equal to the reference"
        if reference is not None and not holds_reference:
            rerun(tuning.reference)
        tuning.verified = True
        self._pending = None       # the step's own time is a warm-up's: not recorded
        if tuning.inherited is not None:
            tuning.chosen = kept[0] if kept else tuning.reference
            tuning.kept = kept
            return
        tuning.kept = [tuning.reference] + kept
        if len(tuning.kept) == 1:
            tuning.chosen = tuning.reference
        else:
            tuning.queue, tuning.rounds = list(tuning.kept), 1

    def finish(self) -> None:
        """Record the pending step's time for its candidate (while measuring) and end it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        tuning = self._tunings[pending.key]
        if tuning.chosen is not None:
            if tuning.samples and pending.config == tuning.chosen:
                self._watch(pending.key, tuning,
                            float(self.timing(pending.config, pending.seconds)))
            return
        if not tuning.queue or tuning.queue[0] != pending.config:
            return
        tuning.queue.pop(0)
        seconds = float(self.timing(pending.config, pending.seconds))
        tuning.samples.setdefault(pending.config, []).append(seconds)
        if tuning.queue:
            return
        means = {c: statistics.fmean(tuning.samples[c]) for c in tuning.samples}
        best = min(means.values())
        alive = [c for c in tuning.kept if c in means and means[c] <= PRUNE * best]
        if tuning.rounds < ROUNDS and len(alive) > 1:
            tuning.queue, tuning.rounds = alive, tuning.rounds + 1
            return
        order = {c: i for i, c in enumerate(tuning.kept)}
        tuning.chosen = min(alive, key=lambda c: (means[c], order[c]))

    def _watch(self, key: Tuple[int, int, str], tuning: _Tuning, seconds: float) -> None:
        """After a choice: measure again when the chosen candidate has become slow (the
        smaller batch sizes that inherited it inherit again once there is a new choice)."""
        tuning.recent.append(seconds)
        if len(tuning.recent) < WATCH << tuning.remeasured:
            return
        best = min(statistics.fmean(v) for v in tuning.samples.values())
        slow = statistics.fmean(tuning.recent) > PRUNE * best
        tuning.recent = []
        if slow:
            batch, T, mode = key
            for b, t, m in [k for k, v in self._tunings.items() if v.inherited is not None]:
                if b < batch and t == T and m == mode:
                    del self._tunings[(b, t, m)]
            tuning.remeasured += 1
            tuning.samples, tuning.chosen = {}, None
            tuning.queue, tuning.rounds = list(tuning.kept), 1

    @property
    def pending(self) -> Optional[_Pending]:
        return self._pending

    # ------------------------------------------------------------ reporting
    def report(self) -> dict:
        """Per measured batch size ("<batch> at T=<T>, <mode>"): the choice, the candidates
        kept and excluded (and why), and the seconds recorded for each."""
        return {f"{b} at T={t}, {m}": tuning.report()
                for (b, t, m), tuning in sorted(self._tunings.items())}

    def __getstate__(self) -> dict:
        # The choices depend on the machine the steps run on: a copy measures again.
        return {"measured": False}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def timed(config: Config, fn: Callable[[], object]):
    """Run fn with OpenBLAS at the configuration's thread count; (its result, seconds)."""
    hold_blas_threads(config.threads)
    try:
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start
    finally:
        release_blas_threads()


def _digests(arrays: tuple) -> list:
    """A digest of each array's bytes (None for a missing input gradient)."""
    return [None if a is None else
            hashlib.blake2b(memoryview(np.ascontiguousarray(a)).cast("B"),
                            digest_size=16).digest() for a in arrays]
