"""Runtime CPU dispatch of the elementwise kernels (src/ckpt/_simd.h).

Every variant this CPU supports is run against the baseline one, and must give the same bits:
the elementwise maps by construction (one C source, no floating-point contraction), and the
reductions too -- the column sums add rows in order, LayerNorm's row statistics run in 8 lanes
in every variant, and the losses are not dispatched -- so the tolerance stated for them is zero.
Variants the CPU lacks are skipped, saying so. Also: CKPT_SIMD at import, the private switch,
and that only the dispatched AVX copies contain AVX instructions (the wheel stays portable).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ckpt
from ckpt import SGD, Adam, AdamW, Dense, Dropout, LayerNorm, Residual, SegmentCheckpointer, _core
from ckpt.train import build_mlp, fit

from conftest import ACTIVATIONS, TABLE

SUPPORTED = _core._supported_simd()
# Each variant above the baseline, compared with the baseline.
ABOVE_BASELINE = [v for v in _core.SIMD_VARIANTS if v != "baseline"]
DTYPES = [np.float32, np.float64]
# Vector bodies and tails: widths below, at and around 4, 8 and 16 lanes.
WIDTHS = [1, 3, 8, 13, 16, 37, 64]


@pytest.fixture(params=ABOVE_BASELINE)
def variant(request):
    name = request.param
    if name not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {name} variant (it supports {', '.join(SUPPORTED)})")
    return name


@pytest.fixture(autouse=True)
def restore_simd():
    before = _core.simd_variant()
    yield
    _core._set_simd(before)


def run_in(name, compute):
    """compute() with the kernels in variant `name`; its arrays, copied."""
    _core._set_simd(name)
    return [np.array(a, copy=True) for a in compute()]


def assert_same_bits(variant, compute):
    """compute() gives the same bits in `variant` as in the baseline (NaN payloads included)."""
    expected = run_in("baseline", compute)
    got = run_in(variant, compute)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape
        bits = np.dtype(f"u{a.itemsize}")
        diff = np.flatnonzero(a.view(bits) != b.view(bits))
        assert diff.size == 0, (f"output {i} differs from the baseline at {diff.size} of "
                                f"{a.size} values, first {diff[0]}: {a.flat[diff[0]]!r} != "
                                f"{b.flat[diff[0]]!r}")


def unaligned(a):
    """A C-contiguous copy of `a` that starts one element past an aligned address."""
    buf = np.empty(a.size + 1, a.dtype)
    out = buf[1:].reshape(a.shape)
    out[...] = a
    return out


def special_values(dtype, n):
    """Values that test every branch: signed zeros, NaN, infinities, huge and tiny."""
    big = np.finfo(dtype).max
    tiny = np.finfo(dtype).tiny
    v = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, big, -big, tiny, -tiny, 50.0, -50.0, 1.0],
                 dtype)
    return np.resize(v, n)


def test_the_variants_and_the_active_one():
    assert _core.SIMD_VARIANTS == ("baseline", "avx2", "avx512")
    assert SUPPORTED[0] == "baseline"
    assert set(SUPPORTED) <= set(_core.SIMD_VARIANTS)
    assert ckpt.simd_variant() in SUPPORTED
    if platform.machine() not in ("x86_64", "AMD64"):
        assert SUPPORTED == ("baseline",)


@pytest.mark.parametrize("name", _core.SIMD_VARIANTS)
def test_set_simd_switches_or_refuses_without_change(name):
    if name in SUPPORTED:
        _core._set_simd(name)
        assert ckpt.simd_variant() == name
    else:
        before = ckpt.simd_variant()
        with pytest.raises(ValueError, match=f"cannot run the {name} variant"):
            _core._set_simd(name)
        assert ckpt.simd_variant() == before


@pytest.mark.parametrize("bad", ["avx3", "", "AVX2", None, 2])
def test_set_simd_refuses_unknown_names(bad):
    before = ckpt.simd_variant()
    with pytest.raises(ValueError, match="unknown SIMD variant"):
        _core._set_simd(bad)
    assert ckpt.simd_variant() == before


# --------------------------------------------------------------------------------------------
# Elementwise maps: bit-identical in every variant
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a or "identity")
@pytest.mark.parametrize("n", WIDTHS)
def test_bias_activation_and_delta(variant, dtype, activation, n):
    """dense_forward (GEMM, then the bias and activation pass) and dense_backward (the delta
    g * act'(v), the bias gradient's column sums, GEMMs) on values that take every branch."""
    act = TABLE[activation].code
    rng = np.random.default_rng(n)
    m, k = 9, 5
    x = unaligned(rng.standard_normal((m, k)).astype(dtype) * 3)
    w = rng.standard_normal((k, n)).astype(dtype)
    b = unaligned(rng.standard_normal(n).astype(dtype))
    b[::4] = special_values(dtype, b[::4].size)
    g = unaligned(rng.standard_normal((m, n)).astype(dtype))
    g[1] = special_values(dtype, n)

    def compute():
        y = unaligned(np.zeros((m, n), dtype))
        _core.dense_forward(x, w, b, y, act, 0.03)
        v = y.copy()
        if activation == "gelu":
            _core.dense_forward(x, w, b, v, TABLE[None].code, 0.03)
        d = unaligned(np.zeros((m, n), dtype))
        gw, gb, gx = np.zeros((k, n), dtype), unaligned(np.full(n, 0.5, dtype)), np.zeros((m, k), dtype)
        _core.dense_backward(x, w, g, v, d, gw, gb, gx, act, 0.03)
        # d aliasing v, as the executor runs it
        _core.dense_backward(x, w, g, v, v, gw, gb, None, act, 0.03)
        return y, d, v, gw, gb, gx

    assert_same_bits(variant, compute)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("size", [1, 7, 8, 33, 1000])
def test_optimizer_updates(variant, dtype, size):
    """sgd_step, SGD with momentum (plain, Nesterov, none) and Adam / AdamW, a few steps."""
    rng = np.random.default_rng(size)
    p0 = unaligned(rng.standard_normal(size).astype(dtype))
    grads = [unaligned(rng.standard_normal(size).astype(dtype)) for _ in range(3)]
    grads[1][::5] = special_values(dtype, grads[1][::5].size)

    def compute():
        p, buf, nbuf = p0.copy(), np.zeros(size, dtype), np.zeros(size, dtype)
        m, v = unaligned(np.zeros(size, dtype)), unaligned(np.zeros(size, dtype))
        q = p0.copy()
        for step, g in enumerate(grads, 1):
            _core.sgd_step(p, g, 0.05)
            _core.sgd_momentum_step(p, g, buf, 0.1, 0.9, 1e-3, False)
            _core.sgd_momentum_step(p, g, nbuf, 0.1, 0.8, 0.0, True)
            _core.sgd_momentum_step(p, g, None, 0.1, 0.0, 1e-2, False)
            _core.adam_step(q, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 1e-2, step == 2, step)
        return p, buf, nbuf, q, m, v

    assert_same_bits(variant, compute)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_dropout_apply(variant, dtype, n, p):
    rng = np.random.default_rng(n)
    src = unaligned(rng.standard_normal((11, n)).astype(dtype))
    src[2] = special_values(dtype, n)

    def compute():
        dst = unaligned(np.zeros((11, n), dtype))
        _core.dropout_apply(src, dst, p, 1234, 3, 17)
        return (dst,)

    assert_same_bits(variant, compute)


# --------------------------------------------------------------------------------------------
# Reductions: the same bits too (stated tolerance: zero)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("n", WIDTHS + [100, 1024])
def test_layernorm_row_statistics(variant, dtype, n):
    """LayerNorm forward and backward: row means and variances in 8 lanes, then maps."""
    rng = np.random.default_rng(n)
    x = unaligned((rng.standard_normal((7, n)) * 5 + 3).astype(dtype))
    gamma = unaligned(rng.standard_normal(n).astype(dtype))
    beta = rng.standard_normal(n).astype(dtype)
    g = unaligned(rng.standard_normal((7, n)).astype(dtype))

    def compute():
        y = unaligned(np.zeros((7, n), dtype))
        _core.layernorm_forward(x, gamma, beta, y, 1e-5)
        gx = unaligned(np.zeros((7, n), dtype))
        ggamma, gbeta = np.full(n, 0.25, dtype), unaligned(np.zeros(n, dtype))
        _core.layernorm_backward(x, gamma, g, gx, ggamma, gbeta, 1e-5)
        _core.layernorm_backward(x, gamma, g, None, ggamma, gbeta, 1e-5)
        return y, gx, ggamma, gbeta

    assert_same_bits(variant, compute)


# --------------------------------------------------------------------------------------------
# Whole chains and training: the same bits
# --------------------------------------------------------------------------------------------

def mixed_chain(dtype):
    rng = np.random.default_rng(0)
    return [Dense(12, 24, "relu", dtype=dtype, rng=rng),
            Residual(LayerNorm(24, dtype=dtype), Dense(24, 40, "gelu", dtype=dtype, rng=rng),
                     Dropout(0.3), Dense(40, 24, "tanh", dtype=dtype, rng=rng)),
            Dense(24, 33, "sigmoid", dtype=dtype, rng=rng), Dropout(0.2),
            Dense(33, 16, "softplus", dtype=dtype, rng=rng),
            Dense(16, 16, "leaky_relu", dtype=dtype, rng=rng), LayerNorm(16, dtype=dtype),
            Dense(16, 5, dtype=dtype, rng=rng)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["blas", "split"])
def test_chain_gradients_and_sgd_update(variant, dtype, mode, restore_num_threads):
    """Forward, backward through a checkpointed chain of every element kind and activation, then
    the executor's fused SGD update; T fixed at 2 so that "split" really splits."""
    ckpt.set_num_threads(2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 12)).astype(dtype)
    g = rng.standard_normal((37, 5)).astype(dtype)

    def compute():
        model = SegmentCheckpointer(mixed_chain(dtype), 2, seed=5, threads_mode=mode)
        y = model.forward(x).copy()
        gx = model.backward(g).copy()
        grads = [a.copy() for a in model.gradients()]
        model.update(0.1)
        return [y, gx] + grads + [p.copy() for p in model.params()]

    assert_same_bits(variant, compute)


@pytest.mark.parametrize("optimizer", [Adam, AdamW, SGD])
def test_training_run(variant, optimizer):
    """Two epochs of ckpt.fit (softmax cross-entropy, Adam / AdamW / SGD with momentum):
    the same parameters and history."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((96, 20)).astype(np.float32)
    y = rng.integers(0, 4, 96)

    def compute():
        model = SegmentCheckpointer(build_mlp(20, 3, 32, 4, "tanh", np.float32, seed=1), 1)
        opt = optimizer(model, lr=0.01) if optimizer is not SGD else SGD(model, lr=0.05,
                                                                          momentum=0.9)
        history = fit(model, X, y, optimizer=opt, epochs=2, batch_size=16, seed=0)
        return [np.asarray(history["loss"])] + [p.copy() for p in model.params()]

    assert_same_bits(variant, compute)


# --------------------------------------------------------------------------------------------
# CKPT_SIMD at import
# --------------------------------------------------------------------------------------------

BEST = SUPPORTED[-1]


@pytest.mark.parametrize("value, expected", [(None, BEST), ("", BEST), ("auto", BEST),
                                             (" Auto ", BEST), ("baseline", "baseline"),
                                             ("BASELINE\n", "baseline")])
def test_choose_simd(value, expected):
    assert _core._choose_simd(value) == (expected, None)


@pytest.mark.parametrize("name", _core.SIMD_VARIANTS)
def test_choose_simd_falls_back_with_a_warning_when_the_cpu_lacks_it(name):
    chosen, warning = _core._choose_simd(name)
    if name in SUPPORTED:
        assert (chosen, warning) == (name, None)
    else:
        assert chosen == BEST
        assert warning == (f"CKPT_SIMD={name}: this CPU cannot run {name}; ckpt's elementwise "
                           f"kernels run in {BEST}, the best it supports")


@pytest.mark.parametrize("bad", ["avx3", "sse2", "avx-512", "native"])
def test_choose_simd_refuses_unknown_values(bad):
    with pytest.raises(ValueError, match=rf"CKPT_SIMD='{bad}' is not a SIMD variant: use one "
                                         rf"of baseline, avx2, avx512, or auto"):
        _core._choose_simd(bad)


def _import_with(value):
    env = dict(os.environ, CKPT_SIMD=value)
    return subprocess.run([sys.executable, "-c", "import ckpt; print(ckpt.simd_variant())"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_forces_a_variant_at_import():
    for name in SUPPORTED:
        done = _import_with(name)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == name
        assert "RuntimeWarning" not in done.stderr


def test_environment_variable_unknown_value_fails_the_import():
    done = _import_with("avx3")
    assert done.returncode != 0
    assert "ValueError: CKPT_SIMD='avx3' is not a SIMD variant" in done.stderr


def test_environment_variable_unsupported_variant_warns_and_falls_back():
    lacking = [v for v in _core.SIMD_VARIANTS if v not in SUPPORTED]
    if not lacking:
        pytest.skip("this CPU supports every variant")
    done = _import_with(lacking[-1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == BEST
    assert f"RuntimeWarning: CKPT_SIMD={lacking[-1]}: this CPU cannot run" in done.stderr


# --------------------------------------------------------------------------------------------
# Portability: AVX instructions only in the dispatched copies
# --------------------------------------------------------------------------------------------

FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
# VEX/EVEX-encoded instructions all start with "v" (vmovups, vaddps, vzeroupper, ...); the
# legacy ones that do too are the segment-verification instructions verr/verw.
AVX_INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\s+(v(?!err|erw)\w+)|%[yz]mm\d|%k[0-7]\b")
FMA_INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\s+vf(n?)m(add|sub)")
PACKED_SSE = re.compile(r"^\s*[0-9a-f]+:\s+(add|sub|mul)p[sd]\s")


def _disassembly(path):
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True,
                          text=True, check=True, timeout=120).stdout


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX variants are x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_avx_instructions_only_in_the_dispatched_copies():
    """No function of ckpt's extensions uses AVX unless it is an _avx2 / _avx512 copy of a
    kernel (what a -march=native build would break); those do, with the wide registers when the
    build vectorises (the baseline copies use packed SSE: not so under -Og or ASan); and no
    function fuses multiply-add (the build has -ffp-contract=off)."""
    from ckpt import _planner

    vector_width = {}
    baseline_packed = False
    for module in (_core, _planner):
        function = None
        for line in _disassembly(module.__file__).splitlines():
            match = FUNCTION.match(line)
            if match:
                function = match.group(1)
                continue
            if re.search(r"_baseline\b", function or "") and PACKED_SSE.search(line):
                baseline_packed = True
            assert not FMA_INSTRUCTION.search(line), f"{function} contracts: {line.strip()}"
            if AVX_INSTRUCTION.search(line):
                copy = re.search(r"_(avx2|avx512)\b", function or "")
                assert copy, (f"{os.path.basename(module.__file__)}: {function}, not an AVX copy "
                              f"of a kernel, has an AVX instruction: {line.strip()}")
                vector_width.setdefault(copy.group(1), set()).update(
                    re.findall(r"%([yz]mm)", line))
    assert set(vector_width) == {"avx2", "avx512"}
    assert "zmm" not in vector_width["avx2"]
    if baseline_packed:
        assert "ymm" in vector_width["avx2"]
        assert "zmm" in vector_width["avx512"]


def test_ckpt_train_json_reports_the_variant(capsys):
    from ckpt.cli import main

    _core._set_simd("baseline")
    assert main(["train", "--epochs", "1", "--depth", "2", "--width", "8", "--json"]) == 0
    results = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    assert results["simd"] == "baseline"
