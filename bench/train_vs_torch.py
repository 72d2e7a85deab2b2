"""`ckpt train` against the same training in PyTorch, each with its default threads.

    python bench/train_vs_torch.py [--rounds 3] [--depth 9] [--width 256] [--batch-size 64]
                                   [--epochs 30] [--checkpoint-every 1]

ckpt side: the command a user runs, `ckpt train ... --json`, in a fresh process; its "seconds"
is the training loop alone (data loading and evaluation aside). PyTorch side: the same network
(depth Linear layers, ReLU between them, He-normal weights), the same data (ckpt's bundled
digits, the same train/test split and scaling, read through ckpt.cli), Adam at lr 1e-3, the
same batch size and epochs, cross-entropy, a fresh shuffle per epoch; the loop is timed the same
way, in its own fresh process with PyTorch's default threads. The two alternate, round after
round. Issue 12's target: ckpt ≥ 1.5× faster (median over median).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

TORCH = r"""
import json, sys, time
import numpy as np
import torch
from ckpt import cli, datasets
depth, width, batch, epochs = (int(a) for a in sys.argv[1:5])
# The split and scaling of `ckpt train` on the bundled digits (cli._train), same seed.
args = cli.build_parser().parse_args(["train"])
data = datasets.prepare_training_data(datasets.digits_table(np.float32),
                                      np.random.default_rng(args.seed),
                                      test_fraction=cli.TEST_FRACTION,
                                      scaler=datasets.digits_scaler())
Xtr, ytr, Xte, yte = data.X_train, data.y_train, data.X_test, data.y_test
Xtr = torch.from_numpy(np.ascontiguousarray(Xtr, np.float32))
ytr = torch.from_numpy(np.asarray(ytr, np.int64))
torch.manual_seed(0)
sizes = [Xtr.shape[1]] + [width] * (depth - 1) + [10]
layers = []
for i in range(depth):
    lin = torch.nn.Linear(sizes[i], sizes[i + 1])
    torch.nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    torch.nn.init.zeros_(lin.bias)
    layers.append(lin)
    if i < depth - 1:
        layers.append(torch.nn.ReLU())
model = torch.nn.Sequential(*layers)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = torch.nn.CrossEntropyLoss()
gen = torch.Generator().manual_seed(0)
start = time.perf_counter()
for epoch in range(epochs):
    order = torch.randperm(len(Xtr), generator=gen)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(Xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
seconds = time.perf_counter() - start
with torch.no_grad():
    acc = (model(torch.from_numpy(np.ascontiguousarray(Xte, np.float32))).argmax(1).numpy()
           == np.asarray(yte)).mean()
print(json.dumps({"seconds": seconds, "test_accuracy": float(acc),
                  "threads": torch.get_num_threads()}))
"""


def run(cmd: list) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=9)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--checkpoint-every", type=int, default=1)
    a = p.parse_args(argv)
    shape = [str(a.depth), str(a.width), str(a.batch_size), str(a.epochs)]
    ckpt_cmd = [sys.executable, "-m", "ckpt", "train", "--depth", shape[0], "--width", shape[1],
                "--batch-size", shape[2], "--epochs", shape[3],
                "--checkpoint-every", str(a.checkpoint_every), "--json"]
    torch_cmd = [sys.executable, "-c", TORCH] + shape
    times = {"ckpt": [], "torch": []}
    last = {}
    for r in range(a.rounds):
        for name, cmd in (("ckpt", ckpt_cmd), ("torch", torch_cmd)):
            res = run(cmd)
            times[name].append(res["seconds"])
            last[name] = res
            print(f"round {r + 1} {name:5s} {res['seconds']:.2f} s, test accuracy "
                  f"{res['test_accuracy']:.4f}, threads {res.get('threads')}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["torch"] / med["ckpt"]
    print("\n| contender | threads | training loop, median (min-max) | test accuracy |\n|---|---|---|---|")
    for name in ("ckpt", "torch"):
        v = times[name]
        print(f"| {'ckpt train' if name == 'ckpt' else 'PyTorch 2.13'} | {last[name].get('threads')}"
              f"{' (' + last[name]['threads_mode'] + ')' if name == 'ckpt' else ''} | "
              f"{med[name]:.2f} s ({min(v):.2f}-{max(v):.2f}) | {last[name]['test_accuracy']:.4f} |")
    print(f"\nckpt train is {ratio:.2f}x faster than PyTorch (target >= 1.5x: "
          f"{'met' if ratio >= 1.5 else 'missed'})")


if __name__ == "__main__":
    main()
