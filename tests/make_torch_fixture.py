"""Write tests/data/torch_residual_block.npz: PyTorch's outputs and gradients for the cases that
tests/test_torch_parity.py checks ckpt against (in CI, without torch).

    pip install torch && python tests/make_torch_fixture.py

Run it by hand when the cases change; the .npz is committed. Everything is float64.

Cases (width 6, batch 5, fixed seed; every parameter drawn at random, LayerNorm weight and bias
included, so that none of them sits at its default):

- ``relu`` / ``gelu``: a pre-norm residual block y = x + fc2(act(fc1(norm(x)))) with
  ``nn.LayerNorm(6)``, ``nn.Linear(6, 6)``, ``nn.ReLU()`` or ``nn.GELU()`` (exact, erf form),
  ``nn.Linear(6, 6)``;
- ``layernorm``: ``nn.LayerNorm(6)`` alone;
- ``chain``: ``nn.Sequential(relu block, gelu block, nn.LayerNorm(6))`` (parameter names
  prefixed by the module's index, e.g. ``0_fc1_weight``), what a checkpointer runs in segments.

For each case it stores the input ``x``, the upstream gradient ``g``, the output ``y``, the
input gradient ``gx`` (of sum(y * g)), and every parameter with its gradient, under
``<case>__<name>``: ``norm_weight``, ``norm_bias``, ``fc1_weight``, ``fc1_bias``, ``fc2_weight``,
``fc2_bias`` (torch layout: a Linear's weight is (out, in), the transpose of ckpt's Dense.W),
each with a ``grad_`` twin. ``meta__torch_version``, ``meta__eps`` and ``meta__seed`` record how
it was made.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

SEED = 1234
WIDTH = 6
BATCH = 5
EPS = 1e-5
OUT = Path(__file__).resolve().parent / "data" / "torch_residual_block.npz"


class Block(nn.Module):
    """x + fc2(act(fc1(norm(x))))."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH, eps=EPS)
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.act = act
        self.fc2 = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Every parameter from a fixed generator: weights ~ N(0, 0.6), LayerNorm weight around 1,
    biases ~ N(0, 0.3), so the ReLU sees both signs and no parameter keeps its default."""
    def noise(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen, dtype=torch.float64)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + 0.4 * noise(m.weight))
                m.bias.copy_(0.3 * noise(m.bias))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(0.6 * noise(m.weight))
                m.bias.copy_(0.3 * noise(m.bias))


def _case(module: nn.Module, gen: torch.Generator, prefix: str, out: dict) -> None:
    module = module.double()
    _randomise(module, gen)
    x = (1.5 * torch.randn(BATCH, WIDTH, generator=gen, dtype=torch.float64)
         + 0.5).requires_grad_(True)
    g = torch.randn(BATCH, WIDTH, generator=gen, dtype=torch.float64)
    y = module(x)
    y.backward(g)
    out[f"{prefix}__x"] = x.detach().numpy().copy()
    out[f"{prefix}__g"] = g.numpy().copy()
    out[f"{prefix}__y"] = y.detach().numpy().copy()
    out[f"{prefix}__gx"] = x.grad.numpy().copy()
    for name, p in module.named_parameters():
        key = name.replace(".", "_")
        out[f"{prefix}__{key}"] = p.detach().numpy().copy()
        out[f"{prefix}__grad_{key}"] = p.grad.numpy().copy()


def main() -> None:
    gen = torch.Generator().manual_seed(SEED)
    out: dict = {}
    _case(Block(nn.ReLU()), gen, "relu", out)
    _case(Block(nn.GELU()), gen, "gelu", out)
    _case(nn.LayerNorm(WIDTH, eps=EPS), gen, "layernorm", out)
    _case(nn.Sequential(Block(nn.ReLU()), Block(nn.GELU()), nn.LayerNorm(WIDTH, eps=EPS)), gen,
          "chain", out)
    out["meta__torch_version"] = np.array(torch.__version__)
    out["meta__eps"] = np.array(EPS)
    out["meta__seed"] = np.array(SEED)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(out)} arrays, torch {torch.__version__})")


if __name__ == "__main__":
    main()
