"""MemoryUsageTracker: exact, lock-free byte counts of what checkpointing holds and recomputes."""
from __future__ import annotations

import numbers

from ckpt._core import AtomicCounters

# One count is at most this, far above any real buffer. Sums of counts can still pass 2**63 (the
# cumulative recomputed figure after 2**15 such counts): the counters saturate at 2**63 - 1
# instead of wrapping (see _atomic.h).
_MAX_BYTES = 2**48


def _byte_count(nbytes: object) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(f"a byte count must be an integer, got {type(nbytes).__name__} {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"a byte count must be non-negative, got {nbytes}")
    if nbytes > _MAX_BYTES:
        raise ValueError(f"a byte count must be at most 2**48, got {nbytes}")
    return int(nbytes)


class MemoryUsageTracker(AtomicCounters):
    """Counts activation and gradient bytes held, bytes recomputed, and the exact peak.

    The four figures of scirs2-neural's tracker, as read-only properties:

    - ``stored_activation_bytes``: activations held now;
    - ``recomputed_bytes``: activations recomputed so far (cumulative);
    - ``gradient_bytes``: gradient buffers held now;
    - ``peak_bytes``: the most ever held of stored activations plus gradients.

    The counters are C atomics, updated lock-free from Python threads and from ckpt's ``nogil``
    kernels alike. Unlike the seed, gradients can be released, and the peak is exact: the maximum
    over one total order of all updates, not an estimate. Releasing more than is held clamps at
    zero (the release methods return what was really released). No figure wraps: each stops at
    2**63 - 1, meaning "at least that much".
    """

    def record_stored_activation(self, nbytes: int) -> None:
        """Record that ``nbytes`` of activations are now held."""
        self._record_stored(_byte_count(nbytes))

    def release_stored_activation(self, nbytes: int) -> int:
        """Record that ``nbytes`` of held activations were freed; returns the bytes released."""
        return self._release_stored(_byte_count(nbytes))

    def record_recomputed(self, nbytes: int) -> None:
        """Record that ``nbytes`` of activations were recomputed."""
        self._record_recomputed(_byte_count(nbytes))

    def record_gradient(self, nbytes: int) -> None:
        """Record that ``nbytes`` of gradient buffers are now held."""
        self._record_gradient(_byte_count(nbytes))

    def release_gradient(self, nbytes: int) -> int:
        """Record that ``nbytes`` of gradient buffers were freed; returns the bytes released."""
        return self._release_gradient(_byte_count(nbytes))

    def reset(self) -> None:
        """Set every counter, the peak included, back to zero."""
        self._reset()

    def __reduce__(self):
        # Pickle, copy and deepcopy keep the four figures (the counters are C state).
        return (type(self), (), (self.stored_activation_bytes, self.recomputed_bytes,
                                 self.gradient_bytes, self.peak_bytes))

    def __setstate__(self, state: tuple) -> None:
        try:
            stored, recomputed, gradient, peak = (_byte_count(value) for value in state)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a MemoryUsageTracker state is four byte counts "
                             f"(stored, recomputed, gradient, peak), got {state!r}: {exc}") from None
        self._restore(stored, recomputed, gradient, peak)

    def summary(self) -> str:
        """One line in KiB, like the seed's."""
        return (
            f"MemoryUsage {{ stored_activations: {self.stored_activation_bytes / 1024:.1f} KiB, "
            f"recomputed: {self.recomputed_bytes / 1024:.1f} KiB, "
            f"gradients: {self.gradient_bytes / 1024:.1f} KiB, "
            f"peak: {self.peak_bytes / 1024:.1f} KiB }}"
        )

    def __repr__(self) -> str:
        return (
            f"MemoryUsageTracker(stored_activation_bytes={self.stored_activation_bytes}, "
            f"recomputed_bytes={self.recomputed_bytes}, gradient_bytes={self.gradient_bytes}, "
            f"peak_bytes={self.peak_bytes})"
        )
