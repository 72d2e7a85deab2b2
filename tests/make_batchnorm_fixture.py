"""Write tests/data/torch_batchnorm.npz: what PyTorch's BatchNorm1d does over 5 SGD steps, for
tests/test_batchnorm.py to hold ckpt's BatchNorm to (in CI, without torch).

    pip install torch && python tests/make_batchnorm_fixture.py

Run it by hand when the case changes; the .npz is committed. Everything is float64.

The network is nn.Sequential(Linear(6, 8), BatchNorm1d(8, momentum=0.1), ReLU(), Linear(8, 3)),
every parameter drawn from a fixed generator; each step takes a fixed batch of 7 rows, the loss
is the mean squared error, and plain SGD (lr 0.1) updates the parameters. Stored: the initial
parameters (``init__<name>``, torch layout: a Linear's weight is (out, in)), the batches
(``x``, ``t``: 5 x 7 x 6 and 5 x 7 x 3), and after the 5 steps the parameters (``final__<name>``)
and the BatchNorm buffers (``plain__running_mean``, ``plain__running_var``,
``plain__num_batches_tracked``).

The same run under ``torch.utils.checkpoint.checkpoint`` (``use_reentrant=False``, the whole
network one checkpointed segment) is stored too, as ``checkpoint__*``: its forward runs again in
the backward and updates the running statistics a second time per step (pytorch#96136), which
the docs quote from this file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

SEED = 4321
STEPS, BATCH, N_IN, WIDTH, N_OUT = 5, 7, 6, 8, 3
LR = 0.1
OUT = Path(__file__).resolve().parent / "data" / "torch_batchnorm.npz"


def network(gen: torch.Generator) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(N_IN, WIDTH), nn.BatchNorm1d(WIDTH, momentum=0.1), nn.ReLU(),
                        nn.Linear(WIDTH, N_OUT)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        net[1].weight.add_(1.0)     # around 1, so that no parameter sits at its default
    return net


def train(net: nn.Sequential, xs: torch.Tensor, ts: torch.Tensor, checkpointed: bool) -> None:
    net.train()
    for x, t in zip(xs, ts):
        net.zero_grad()
        y = checkpoint(net, x, use_reentrant=False) if checkpointed else net(x)
        loss = ((y - t) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= LR * p.grad


def main() -> None:
    gen = torch.Generator().manual_seed(SEED)
    net = network(gen)
    init = {name.replace(".", "_"): p.detach().numpy().copy() for name, p in net.named_parameters()}
    xs = torch.randn((STEPS, BATCH, N_IN), generator=gen, dtype=torch.float64)
    ts = torch.randn((STEPS, BATCH, N_OUT), generator=gen, dtype=torch.float64)
    out = {f"init__{name}": value for name, value in init.items()}
    out["x"], out["t"] = xs.numpy(), ts.numpy()
    for label, checkpointed in (("plain", False), ("checkpoint", True)):
        run = network(torch.Generator().manual_seed(SEED))
        train(run, xs, ts, checkpointed)
        bn = run[1]
        out[f"{label}__running_mean"] = bn.running_mean.numpy().copy()
        out[f"{label}__running_var"] = bn.running_var.numpy().copy()
        out[f"{label}__num_batches_tracked"] = np.array(int(bn.num_batches_tracked))
        if label == "plain":
            for name, p in run.named_parameters():
                out[f"final__{name.replace('.', '_')}"] = p.detach().numpy().copy()
    out["meta__torch_version"] = np.array(torch.__version__)
    np.savez(OUT, **out)
    print(f"wrote {OUT}: num_batches_tracked {int(out['plain__num_batches_tracked'])} plain, "
          f"{int(out['checkpoint__num_batches_tracked'])} under checkpoint")


if __name__ == "__main__":
    main()
