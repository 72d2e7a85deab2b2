"""Learning-rate schedules: the rate of each optimizer step as a pure function of the step.

A schedule is a small frozen value; ``schedule(step, total_steps)`` is the learning rate of
optimizer step ``step`` (counted from 0, one per batch) of a run of ``total_steps`` steps. It
keeps no state, so a resumed run computes the same rates from the step count alone. Set it
before each step: ``optimizer.lr = schedule(step, total_steps)``.

- :class:`Constant`: ``lr`` throughout.
- :class:`Cosine`: a linear warmup over the first ``floor(warmup * total_steps)`` steps, rising
  to ``lr`` at the last warmup step (step s of W has ``lr * (s + 1) / W``: no step is wasted at
  rate 0), then a half cosine from ``lr`` down towards ``final_lr`` (the SGDR annealing of
  Loshchilov & Hutter, 2017, without restarts). Step s >= W has
  ``final_lr + (lr - final_lr) * (1 + cos(pi * (s - W) / (total_steps - W))) / 2``.
- :class:`OneCycle`: Smith & Topin's one-cycle policy (2018) with PyTorch's ``OneCycleLR``
  formulas (cosine annealing, two phases): from ``lr / div_factor`` up to ``lr`` by step
  ``warmup * total_steps - 1``, then down to ``lr / div_factor / final_div_factor`` at the
  last step; within a phase from a to b at fraction t, ``b + (a - b) * (1 + cos(pi * t)) / 2``.

``SCHEDULES`` maps the names ``constant``, ``cosine`` and ``onecycle`` to the classes, and
:func:`make_schedule` builds one by name. Bad arguments raise ValueError or TypeError naming the
argument and the value.
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, Optional, Type, Union

__all__ = ["Constant", "Cosine", "OneCycle", "SCHEDULES", "Schedule", "make_schedule"]


def _real(value: object, name: str, low: float, high: float = math.inf, *,
          open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a finite float in the interval, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if not math.isfinite(value) or below or above:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def _integer(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _check_step(step: object, total_steps: object) -> "tuple[int, int]":
    total_steps = _integer(total_steps, "total_steps", 1)
    step = _integer(step, "step", 0)
    if step >= total_steps:
        raise ValueError(f"step must be in [0, total_steps) = [0, {total_steps}), got {step}")
    return step, total_steps


def _anneal(start: float, end: float, fraction: float) -> float:
    """Cosine from ``start`` (fraction 0) to ``end`` (fraction 1)."""
    return end + (start - end) * (1.0 + math.cos(math.pi * fraction)) / 2.0


class Schedule(ABC):
    """A learning-rate schedule: ``schedule(step, total_steps)`` -> the step's learning rate."""

    name = ""
    lr: float

    def __call__(self, step: int, total_steps: int) -> float:
        step, total_steps = _check_step(step, total_steps)
        return self._rate(step, total_steps)

    @abstractmethod
    def _rate(self, step: int, total_steps: int) -> float:
        """The rate at a checked step."""


@dataclass(frozen=True)
class Constant(Schedule):
    """``lr`` at every step."""

    lr: float
    name = "constant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _real(self.lr, "lr", 0.0, open_low=True))

    def _rate(self, step: int, total_steps: int) -> float:
        return self.lr


@dataclass(frozen=True)
class Cosine(Schedule):
    """Linear warmup over ``floor(warmup * total_steps)`` steps, then cosine decay from ``lr``
    to ``final_lr`` (reached one step after the last)."""

    lr: float
    warmup: float = 0.0
    final_lr: float = 0.0
    name = "cosine"

    def __post_init__(self) -> None:
        lr = _real(self.lr, "lr", 0.0, open_low=True)
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "warmup", _real(self.warmup, "warmup", 0.0, 1.0,
                                                 open_high=True))
        object.__setattr__(self, "final_lr", _real(self.final_lr, "final_lr", 0.0, lr))

    def warmup_steps(self, total_steps: int) -> int:
        """W: the steps of the linear warmup in a run of ``total_steps``."""
        return math.floor(self.warmup * _integer(total_steps, "total_steps", 1))

    def _rate(self, step: int, total_steps: int) -> float:
        warmup = self.warmup_steps(total_steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        return _anneal(self.lr, self.final_lr, (step - warmup) / (total_steps - warmup))


@dataclass(frozen=True)
class OneCycle(Schedule):
    """The one-cycle policy as PyTorch's ``OneCycleLR(max_lr=lr, pct_start=warmup,
    div_factor, final_div_factor, anneal_strategy="cos", three_phase=False)``."""

    lr: float
    warmup: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    name = "onecycle"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _real(self.lr, "lr", 0.0, open_low=True))
        object.__setattr__(self, "warmup", _real(self.warmup, "warmup", 0.0, 1.0,
                                                 open_high=True))
        object.__setattr__(self, "div_factor", _real(self.div_factor, "div_factor", 1.0))
        object.__setattr__(self, "final_div_factor",
                           _real(self.final_div_factor, "final_div_factor", 1.0))

    @property
    def initial_lr(self) -> float:
        return self.lr / self.div_factor

    @property
    def min_lr(self) -> float:
        return self.initial_lr / self.final_div_factor

    def _rate(self, step: int, total_steps: int) -> float:
        peak = self.warmup * total_steps - 1.0      # the (fractional) step of the peak
        if step <= peak:
            # A peak at step 0 makes the first phase one step long: that step is the peak.
            return _anneal(self.initial_lr, self.lr, step / peak if peak > 0 else 1.0)
        # The second phase runs from the peak (fractional, -1 without warmup) to the last step;
        # warmup < 1 puts the peak before the last step, so the phase is never empty.
        return _anneal(self.lr, self.min_lr, (step - peak) / (total_steps - 1.0 - peak))


SCHEDULES: Dict[str, Type[Schedule]] = {"constant": Constant, "cosine": Cosine,
                                        "onecycle": OneCycle}


def make_schedule(name: str, lr: float, warmup: Optional[float] = None) -> Schedule:
    """The schedule called ``name`` at peak rate ``lr``; ``warmup`` is the warmup fraction of a
    cosine schedule (default 0) or of a one-cycle schedule (default 0.3), and must be None for
    a constant one."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; expected one of "
                         f"{', '.join(sorted(SCHEDULES))}")
    if name == "constant":
        if warmup not in (None, 0, 0.0):
            raise ValueError(f"a constant learning rate has no warmup (got warmup={warmup!r}); "
                             f"use the cosine or onecycle schedule")
        return Constant(lr)
    kind: Union[Type[Cosine], Type[OneCycle]] = SCHEDULES[name]  # type: ignore[assignment]
    return kind(lr) if warmup is None else kind(lr, warmup)
