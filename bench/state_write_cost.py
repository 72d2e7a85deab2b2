"""What writing a resumable state costs against an epoch: ``ckpt train --checkpoint-dir`` on
the digits with a model big enough for an epoch of a second or more, each state write timed.

    python bench/state_write_cost.py [--depth 8] [--width 512] [--epochs 3]

Prints one row per epoch: the epoch's seconds (from the history), the state write's seconds
and bytes, and the write as a fraction of the epoch (the target is under 5%).
"""
import argparse
import contextlib
import io
import json
import os
import tempfile
import time

from ckpt import cli
from ckpt.resume import StateFolder


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    writes = []
    real_write = StateFolder.write

    def timed(self, state):
        start = time.perf_counter()
        real_write(self, state)
        newest = self.files()[-1]
        writes.append((time.perf_counter() - start, os.path.getsize(newest)))
    StateFolder.write = timed
    with tempfile.TemporaryDirectory() as folder:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            cli.main(["train", "--depth", str(args.depth), "--width", str(args.width),
                      "--epochs", str(args.epochs), "--checkpoint-dir",
                      os.path.join(folder, "states"), "--json"])
        results = json.loads(buffer.getvalue().strip().splitlines()[-1])
    seconds = results["history"]["seconds"]
    print(f"depth {args.depth}, width {args.width}, {results['parameter_count']:,} parameters, "
          f"{results['threads']} threads")
    print(f"{'epoch':>5}  {'epoch s':>8}  {'write s':>8}  {'state MiB':>9}  {'write/epoch':>11}")
    for epoch, (epoch_s, (write_s, size)) in enumerate(zip(seconds, writes), 1):
        print(f"{epoch:>5}  {epoch_s:>8.3f}  {write_s:>8.4f}  {size / 2**20:>9.2f}  "
              f"{write_s / epoch_s:>11.2%}")


if __name__ == "__main__":
    main()
