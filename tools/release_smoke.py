"""Smoke test of an installed ckpt, run by tools/build_release.sh from a folder outside the source tree.

Usage: python release_smoke.py EXPECTED_VERSION SITE_PACKAGES

Checks that ``ckpt`` is imported from SITE_PACKAGES (not from a source checkout), that its version is
EXPECTED_VERSION, that its compiled extensions load with their OpenBLAS, and that a checkpointed
step gives the same gradients as one that stores every activation. Exits non-zero on any failure.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    expected_version, site_packages = argv[0], Path(argv[1]).resolve()

    import ckpt
    from ckpt import _core, _planner

    for module in (ckpt, _core, _planner):
        where = Path(module.__file__).resolve()
        if site_packages not in where.parents:
            raise SystemExit(f"{module.__name__} was imported from {where}, not from {site_packages}")
    if ckpt.__version__ != expected_version:
        raise SystemExit(f"ckpt.__version__ is {ckpt.__version__!r}, expected {expected_version!r}")
    if ckpt.get_num_threads() < 1:
        raise SystemExit(f"ckpt.get_num_threads() returned {ckpt.get_num_threads()}")

    def step(checkpoint_every: int) -> list[np.ndarray]:
        layers = [ckpt.Dense(16, 16, "relu", rng=i) for i in range(5)] + [ckpt.Dense(16, 3, rng=5)]
        model = ckpt.SegmentCheckpointer(layers, checkpoint_every=checkpoint_every)
        x = np.random.default_rng(0).standard_normal((8, 16), dtype=np.float32)
        y = model.forward(x)
        model.zero_grad()
        model.backward(np.ones_like(y) / y.size)
        return [g.copy() for layer in layers for g in layer.gradients()]

    stored, recomputed = step(1), step(3)
    if not all(np.isfinite(g).all() for g in stored):
        raise SystemExit("non-finite gradients")
    if not all(np.array_equal(a, b) for a, b in zip(stored, recomputed)):
        raise SystemExit("checkpointed gradients differ from the stored-activation gradients")
    print(f"import test: ckpt {ckpt.__version__} from {Path(ckpt.__file__).parent}, "
          f"{len(stored)} gradients equal with and without recomputation")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
