"""The Plan: a checked schedule, what it costs, and its explain() table."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ckpt.costs import ChainCosts
from ckpt.plan._chain import _Chain, internal_flops
from ckpt.schedule import KeepInternals, Op, replay, uniform_ops
from ckpt.units import format_size


def _format_flops(x: int) -> str:
    for unit, scale in (("TFLOP", 10**12), ("GFLOP", 10**9), ("MFLOP", 10**6), ("kFLOP", 10**3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x} FLOP"


@dataclass(frozen=True)
class Plan:
    """A checkpointing schedule and what it costs under the model of :mod:`ckpt.plan`.

    ``ops`` is the full schedule (see :mod:`ckpt.plan`); ``peak_bytes``, ``forward_counts``
    and ``stored`` are measured by :func:`ckpt.schedule.replay`, not assumed. ``budget_bytes``
    is the budget it was planned for (for a uniform plan, its own peak). ``keep_internals``:
    True when every forward keeps its element's internals (a compound element's, such as a
    Residual block's) beside its output (plain backprop), False when every backward recomputes
    them, else the positions in ``ops`` of the forwards that keep them (what
    :func:`ckpt.schedule.replay` and the checkpointer take). ``recompute_flops`` counts every
    forward FLOP beyond one forward pass: elements forwarded again, plus the internals
    recomputed in backwards; the plan is the one with the least of it within the budget.
    ``proven_optimal``: no schedule within the budget recomputes less (an exact
    search finished, the closed form, or plain backprop); False for a bounded search, the
    persistent method and uniform plans. ``costs`` are the element descriptions it was planned
    from.
    """

    widths: tuple[int, ...]
    batch_size: int
    dtype: str
    itemsize: int
    budget_bytes: int
    peak_bytes: int
    recompute_flops: int
    forward_counts: tuple[int, ...]
    stored: tuple[int, ...]
    method: str
    ops: tuple[Op, ...] = field(repr=False)
    keep_internals: bool | tuple[int, ...]
    costs: ChainCosts = field(repr=False)
    proven_optimal: bool

    @property
    def n_layers(self) -> int:
        return self.costs.n

    @property
    def activation_bytes(self) -> tuple[int, ...]:
        """Bytes of each activation a_0 .. a_N (outputs only, internals aside)."""
        scale = self.batch_size * self.itemsize
        return tuple(u * scale for u in self.costs.stored)

    @property
    def layer_flops(self) -> tuple[int, ...]:
        """Forward FLOPs of each element for the whole batch."""
        return tuple(self.batch_size * f for f in self.costs.forward_flops)

    @property
    def plain_forward_flops(self) -> int:
        """FLOPs of one forward pass."""
        return sum(self.layer_flops)

    @property
    def total_forward_flops(self) -> int:
        return self.plain_forward_flops + self.recompute_flops

    @property
    def rerun_flops(self) -> int:
        """The part of ``recompute_flops`` spent forwarding elements again."""
        return sum((k - 1) * f for k, f in zip(self.forward_counts, self.layer_flops))

    @property
    def internal_flops(self) -> int:
        """The part of ``recompute_flops`` spent recomputing internals inside backwards (0 when
        they are kept)."""
        return self.recompute_flops - self.rerun_flops

    @property
    def plain_peak_bytes(self) -> int:
        """Peak of plain backprop, which keeps every activation and every internal."""
        trace = replay(uniform_ops(self.n_layers, 1), self.costs, keep_internals=True)
        return trace.peak_units * self.batch_size * self.itemsize

    @property
    def min_budget_bytes(self) -> int:
        return self.costs.min_units() * self.batch_size * self.itemsize

    @property
    def fixed_bytes(self) -> int:
        """What the count leaves out: every parameter and its gradient, plus the two gradient
        buffers of the widest activation (from the element descriptions)."""
        return (2 * self.costs.parameter_count()
                + 2 * self.batch_size * self.costs.gradient_width()) * self.itemsize

    def explain(self) -> str:
        """A readable table: per element its kind and widths, whether its input is stored by the
        first sweep and how many times its forward runs; then peak, budget, extra compute and
        whether the plan is proven optimal."""
        n, w = self.n_layers, self.widths
        stored = set(self.stored)
        kinds = [e.kind for e in self.costs.elements]
        names = sorted(set(kinds))
        what = f"{n} {names[0].capitalize()} layers" if len(names) == 1 else \
            f"{n} elements ({', '.join(f'{kinds.count(k)} {k}' for k in names)})"
        lines = [f"Checkpointing plan ({self.method}): {what}, batch {self.batch_size}, "
                 f"{self.dtype}",
                 f"{'layer':>6} {'kind':>9} {'in':>7} {'out':>7}  {'input stored':>12}  "
                 f"{'forward runs':>12}"]
        for i in range(n):
            lines.append(f"{i:>6} {kinds[i][:9]:>9} {w[i]:>7} {w[i + 1]:>7}  "
                         f"{'yes' if i in stored else '-':>12}  {self.forward_counts[i]:>12}")
        fwd = self.plain_forward_flops
        step = self.costs.step_flops() * self.batch_size
        rows = [("predicted peak", self.peak_bytes), ("budget", self.budget_bytes),
                ("plain backprop peak", self.plain_peak_bytes),
                ("smallest feasible budget", self.min_budget_bytes)]
        lines.append("")
        for name, value in rows:
            lines.append(f"{name:<25} {format_size(value):>11}  ({value} B)")
        lines.append(
            f"{'extra compute':<25} {_format_flops(self.recompute_flops):>11}  = "
            f"{100 * self.recompute_flops / fwd:.1f}% of one forward pass, "
            f"{100 * self.recompute_flops / step:.1f}% of a training step")
        lines.append(
            f"{'':<25} {_format_flops(self.rerun_flops):>11}  forwarding elements again, "
            f"{_format_flops(self.internal_flops)} recomputing internals in backwards"
            + (" (kept)" if self.keep_internals is True else ""))
        compound = sum(1 for e in self.costs.elements if e.tape)
        if compound and self.keep_internals is not True:
            kept = compound - len(self.rebuilt_layers)
            lines.append(f"{'internals kept':<25} {kept} of {compound} compound elements to their "
                         "backward (the others rebuild them there)")
        if self.proven_optimal:
            verdict = "yes: no schedule within the budget needs fewer FLOPs"
        elif self.method.startswith("uniform"):
            verdict = "no: a uniform schedule, planned by no search"
        elif self.method == "persistent":
            verdict = ("not proven: optimal among schedules that keep each checkpoint until "
                       "its backward")
        else:
            verdict = ("not proven: the exact search was too long for this chain; a bounded "
                       "search, checked against every uniform schedule that fits")
        lines.append(f"{'proven optimal':<25} {verdict}")
        lines.append(
            "Not counted: parameters, their gradients, the gradient buffers and BLAS workspace "
            f"(a constant, about {format_size(self.fixed_bytes)} for the parameters, their "
            "gradients and two gradient buffers).")
        return "\n".join(lines)

    @property
    def rebuilt_layers(self) -> tuple[int, ...]:
        """Elements with internals whose backward rebuilds them (they were not kept)."""
        return replay(self.ops, self.costs, self.keep_internals).rebuilt

    def __repr__(self) -> str:
        shown = self.stored if len(self.stored) <= 12 else self.stored[:12] + ("...",)
        share = 100 * self.recompute_flops / self.plain_forward_flops
        keep = self.keep_internals if isinstance(self.keep_internals, bool) else \
            f"<{len(self.keep_internals)} forwards>"
        return (f"Plan(layers={self.n_layers}, batch_size={self.batch_size}, dtype={self.dtype}, "
                f"method={self.method!r}, budget={format_size(self.budget_bytes)}, "
                f"peak={format_size(self.peak_bytes)}, "
                f"plain_peak={format_size(self.plain_peak_bytes)}, "
                f"recompute_flops={self.recompute_flops} (+{share:.1f}% of a forward), "
                f"stored={shown}, keep_internals={keep}, "
                f"proven_optimal={self.proven_optimal})")


def _make_plan(c: _Chain, budget: int, ops: Sequence[Op], keep_internals: KeepInternals,
               proven: bool, method: str) -> Plan:
    trace = replay(ops, c.costs, keep_internals)
    flops = c.flops
    recompute = sum((k - 1) * f for k, f in zip(trace.forward_counts, flops))
    recompute += c.batch_size * internal_flops(c.costs, trace)
    return Plan(widths=c.widths, batch_size=c.batch_size, dtype=c.dtype.name,
                itemsize=c.dtype.itemsize, budget_bytes=budget,
                peak_bytes=trace.peak_units * c.scale, recompute_flops=recompute,
                forward_counts=trace.forward_counts, stored=trace.stored_by_first_sweep,
                method=method, ops=tuple(trace.ops), keep_internals=keep_internals,
                costs=c.costs, proven_optimal=proven)
