"""ckpt against PyTorch, without PyTorch: outputs and gradients of a pre-norm residual block and
of a LayerNorm, with the same float64 weights, match the reference PyTorch computed once
(tests/make_torch_fixture.py wrote tests/data/torch_residual_block.npz; torch's Linear weight is
(out, in), ckpt's Dense.W its transpose).

Each case runs standalone (the layer's forward / backward) and inside a SegmentCheckpointer on
the compiled executor, with the blocks' internals kept (k = 1) and rebuilt in their backward
(k = 0); a chain of two blocks and a LayerNorm (torch's nn.Sequential of them) also runs with
segment recomputation (k = 2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckpt

FIXTURE = Path(__file__).resolve().parent / "data" / "torch_residual_block.npz"
WIDTH = 6
RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def _case(ref: dict, name: str) -> dict:
    prefix = f"{name}__"
    return {key[len(prefix):]: value for key, value in ref.items() if key.startswith(prefix)}


def _block(c: dict, activation: str):
    """ckpt's block with the fixture's weights; its layers in params() order with torch's names."""
    norm = ckpt.LayerNorm(WIDTH, dtype=np.float64)
    fc1 = ckpt.Dense(WIDTH, WIDTH, activation, dtype=np.float64)
    fc2 = ckpt.Dense(WIDTH, WIDTH, dtype=np.float64)
    norm.set_params([c["norm_weight"], c["norm_bias"]])
    fc1.set_params([c["fc1_weight"].T, c["fc1_bias"]])
    fc2.set_params([c["fc2_weight"].T, c["fc2_bias"]])
    block = ckpt.Residual(norm, fc1, fc2)
    names = ["norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]
    return block, names


def _layernorm(c: dict):
    norm = ckpt.LayerNorm(WIDTH, dtype=np.float64)
    norm.set_params([c["weight"], c["bias"]])
    return norm, ["weight", "bias"]


def _torch_layout(name: str, grad: np.ndarray) -> np.ndarray:
    """ckpt's gradient in torch's layout (a Linear's weight transposed)."""
    return grad.T if name.endswith("_weight") and name.startswith("fc") else grad


def _check(c: dict, names: list, y: np.ndarray, gx: np.ndarray, gradients: list) -> None:
    np.testing.assert_allclose(y, c["y"], rtol=RTOL, atol=ATOL, err_msg="output")
    np.testing.assert_allclose(gx, c["gx"], rtol=RTOL, atol=ATOL, err_msg="input gradient")
    assert len(gradients) == len(names)
    for name, grad in zip(names, gradients):
        np.testing.assert_allclose(_torch_layout(name, grad), c[f"grad_{name}"], rtol=RTOL,
                                   atol=ATOL, err_msg=f"gradient of {name}")


BUILDERS = {"relu": lambda c: _block(c, "relu"), "gelu": lambda c: _block(c, "gelu"),
            "layernorm": _layernorm}
CASES = sorted(BUILDERS) + ["chain"]


def test_fixture_is_not_trivial(ref):
    """The reference exercises what it should: parameters away from their defaults, the ReLU
    cutting some values, a branch that changes the output, no zero gradient."""
    for name in CASES:
        c = _case(ref, name)
        assert c["x"].shape == (5, WIDTH) and c["x"].dtype == np.float64
        for key, value in c.items():
            if key.startswith("grad_") or key == "gx":
                assert np.all(np.abs(value) > 0), f"{name}: {key} has zeros"
    assert float(ref["meta__eps"]) == 1e-5, "the layers below use ckpt's default eps"
    ln = _case(ref, "layernorm")
    assert not np.allclose(ln["weight"], 1) and not np.allclose(ln["bias"], 0)
    relu = _case(ref, "relu")
    pre = (relu["x"] - relu["x"].mean(1, keepdims=True)) / np.sqrt(relu["x"].var(1, keepdims=True)
                                                                    + 1e-5)
    pre = (pre * relu["norm_weight"] + relu["norm_bias"]) @ relu["fc1_weight"].T + relu["fc1_bias"]
    assert 0.2 < np.mean(pre > 0) < 0.8, "the ReLU sees both signs"
    assert np.abs(relu["y"] - relu["x"]).max() > 0.1, "the branch contributes"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_standalone(ref, name):
    c = _case(ref, name)
    layer, names = BUILDERS[name](c)
    y = layer.forward(c["x"].copy())
    gx = layer.backward(c["x"].copy(), c["g"].copy())
    _check(c, names, y, gx, layer.gradients())


@pytest.mark.parametrize("k", [1, 0])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_in_checkpointer(ref, name, k):
    """The case's layer as a one-element chain on the compiled executor: k = 1 keeps a block's
    internals from the forward, k = 0 rebuilds them in its backward."""
    c = _case(ref, name)
    layer, names = BUILDERS[name](c)
    model = ckpt.SegmentCheckpointer([layer], checkpoint_every=k)
    assert model.executor == "compiled"
    y = np.array(model.forward(c["x"].copy()))
    gx = model.backward(c["g"].copy())
    _check(c, names, y, gx, model.gradients())
    # A second step from zeroed gradients gives the same (nothing stale in the workspaces).
    model.zero_grad()
    y2 = np.array(model.forward(c["x"].copy()))
    gx2 = model.backward(c["g"].copy())
    _check(c, names, y2, gx2, model.gradients())


def _chain(c: dict):
    """torch's Sequential(relu block, gelu block, LayerNorm) as ckpt layers."""
    layers, names = [], []
    for i, activation in enumerate(("relu", "gelu")):
        sub = {key[len(f"{i}_"):]: value for key, value in c.items() if key.startswith(f"{i}_")}
        block, block_names = _block(sub, activation)
        layers.append(block)
        names += [f"{i}_{n}" for n in block_names]
    norm, norm_names = _layernorm({"weight": c["2_weight"], "bias": c["2_bias"]})
    return layers + [norm], names + [f"2_{n}" for n in norm_names]


def _chain_layout(name: str, grad: np.ndarray) -> np.ndarray:
    return _torch_layout(name.split("_", 1)[1], grad)


@pytest.mark.parametrize("k", [1, 2, 0, None])
def test_chain_in_checkpointer(ref, k):
    """Two blocks and a LayerNorm (torch's Sequential) through the compiled executor under plain
    backprop (k = 1), segments of 2 (one element recomputed), k = 0 (everything recomputed) and
    the default k = floor(sqrt(3)) = 1; and through the layers' own methods, one by one."""
    c = _case(ref, "chain")
    layers, names = _chain(c)
    model = ckpt.SegmentCheckpointer(layers, checkpoint_every=k)
    assert model.executor == "compiled"
    y = np.array(model.forward(c["x"].copy()))
    gx = model.backward(c["g"].copy())
    np.testing.assert_allclose(y, c["y"], rtol=RTOL, atol=ATOL, err_msg="output")
    np.testing.assert_allclose(gx, c["gx"], rtol=RTOL, atol=ATOL, err_msg="input gradient")
    gradients = model.gradients()
    assert len(gradients) == len(names) == 14
    for name, grad in zip(names, gradients):
        np.testing.assert_allclose(_chain_layout(name, grad), c[f"grad_{name}"], rtol=RTOL,
                                   atol=ATOL, err_msg=f"gradient of {name}")


def test_chain_standalone(ref):
    c = _case(ref, "chain")
    layers, names = _chain(c)
    acts = [c["x"].copy()]
    for layer in layers:
        acts.append(layer.forward(acts[-1]))
    g = c["g"].copy()
    for layer, x in zip(reversed(layers), reversed(acts[:-1])):
        g = layer.backward(x, g)
    np.testing.assert_allclose(acts[-1], c["y"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g, c["gx"], rtol=RTOL, atol=ATOL)
    gradients = [grad for layer in layers for grad in layer.gradients()]
    for name, grad in zip(names, gradients):
        np.testing.assert_allclose(_chain_layout(name, grad), c[f"grad_{name}"], rtol=RTOL,
                                   atol=ATOL, err_msg=f"gradient of {name}")
