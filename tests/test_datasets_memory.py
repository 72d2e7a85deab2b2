"""The memory of loading, splitting and scaling a ~200 MB CSV file, measured in a subprocess:
its peak resident memory above what it held before stays within 1.5x the training array."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ckpt

PACKAGE_ROOT = str(Path(ckpt.__file__).resolve().parent.parent)
COLUMNS = 200          # features; wide rows, as a 200 MB table of numbers mostly has

PROBE = r"""
import json, sys
import numpy as np
from ckpt import datasets

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")          # reset the peak (VmHWM) to the memory held now
before = status("VmRSS:")
table = datasets.read_table(sys.argv[1], dtype=np.float32)
data = datasets.prepare_training_data(table, np.random.default_rng(0), test_fraction=0.2)
print(json.dumps({"peak": status("VmHWM:") - before, "train": data.X_train.nbytes,
                  "rows": len(data.X_train) + len(data.X_test),
                  "mean": float(data.X_train.mean(dtype=np.float64))}))
"""


def _write_csv(path, megabytes):
    """A CSV of about ``megabytes`` MB: a header, then 1,000 random rows written over again."""
    rng = np.random.default_rng(0)
    block = "".join(",".join(f"{v:.6f}" for v in row) + f",{label}\n"
                    for row, label in zip(rng.random((1000, COLUMNS)),
                                          rng.integers(0, 5, 1000))).encode()
    copies = megabytes * 10**6 // len(block) + 1
    with open(path, "wb") as f:
        f.write((",".join(f"f{i}" for i in range(COLUMNS)) + ",label\n").encode())
        for _ in range(copies):
            f.write(block)
    return copies * 1000


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="measures the peak through Linux's /proc/self/clear_refs")
def test_loading_splitting_and_scaling_hold_at_most_one_and_a_half_training_arrays(tmp_path):
    path = tmp_path / "big.csv"
    rows = _write_csv(path, 200)
    assert path.stat().st_size > 195 * 10**6
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["rows"] == rows
    assert result["train"] == int(0.8 * rows) * COLUMNS * 4        # float32, 80% of the rows
    assert abs(result["mean"]) < 1e-3                             # it was scaled
    # The one array of all rows is 1.25x the training rows; chunks and labels come on top.
    assert result["peak"] <= 1.5 * result["train"], result
