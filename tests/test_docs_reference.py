"""The API reference covers every public name: read docs/api/*.rst as text (no Sphinx) and compare
its entries (``.. autoclass:: ckpt.Dense``, ``.. py:data:: ckpt.__version__``, ...) with what ckpt
exports. Adding a public name without an entry fails here; so does an entry that no longer imports.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import types
from pathlib import Path

import pytest

import ckpt
import ckpt.distributed
import ckpt.plan
import ckpt.threads

API = Path(__file__).resolve().parent.parent / "docs" / "api"

# One entry per line: the directive and the dotted name it documents.
ENTRY = re.compile(r"^\.\. (auto(?:class|exception|function|data|module)|"
                   r"py:(?:class|exception|function|data|module))::\s*(\S+)\s*$", re.M)
VALUE = re.compile(r"^\.\. py:data::\s*(\S+)\s*\n\s+:value:\s*(.+?)\s*$", re.M)

# Public, but not in ckpt.__all__: the lazily loaded estimators, the planner's functions, and the
# two modules whose functions users call directly.
EXTRA_NAMES = ("ckpt.MLPClassifier", "ckpt.MLPRegressor", "ckpt.distributed", "ckpt.threads")
MODULES_IN_FULL = (ckpt.distributed, ckpt.threads)


def api_sources() -> dict:
    sources = {path.name: path.read_text(encoding="utf-8") for path in sorted(API.glob("*.rst"))}
    assert sources, f"no reference pages in {API}"
    return sources


def entries(sources: dict) -> set:
    return {name for text in sources.values() for _, name in ENTRY.findall(text)}


def resolve(dotted: str):
    """The object a dotted name stands for: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def public_names() -> list:
    names = [f"ckpt.{name}" for name in ckpt.__all__]
    names += list(EXTRA_NAMES)
    names += [f"ckpt.plan.{name}" for name in ckpt.plan.__all__]
    for module in MODULES_IN_FULL:
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isclass(obj) or callable(obj)):
                continue
            if getattr(obj, "__module__", None) == module.__name__:
                names.append(f"{module.__name__}.{name}")
    return names


def _same_object_key(obj):
    # Classes, functions and modules are documented once under any of their names (ckpt.units'
    # parse_size covers ckpt.plan.parse_size; ckpt.estimators' classes cover ckpt.MLPClassifier).
    # Plain values (a version string) must be documented under their own name.
    if isinstance(obj, types.ModuleType) or inspect.isclass(obj) or callable(obj):
        return id(obj)
    return None


def missing(sources: dict) -> list:
    documented = entries(sources)
    covered = {_same_object_key(resolve(name)) for name in documented} - {None}
    return [name for name in public_names()
            if name not in documented and _same_object_key(resolve(name)) not in covered]


def test_every_public_name_has_an_entry():
    assert missing(api_sources()) == []


def test_every_entry_imports():
    for name in sorted(entries(api_sources())):
        resolve(name)


def test_stated_values_are_the_real_ones():
    stated = {name: value for text in api_sources().values() for name, value in VALUE.findall(text)}
    assert stated, "the reference states no :value: at all"
    for name, value in stated.items():
        assert ast.literal_eval(value) == resolve(name), name


@pytest.mark.parametrize("name", ["ckpt.SegmentCheckpointer", "ckpt.__version__",
                                  "ckpt.estimators.MLPRegressor", "ckpt.units.parse_size",
                                  "ckpt.distributed.shard_batches", "ckpt.threads"])
def test_a_removed_entry_is_reported(name):
    sources = api_sources()
    line = re.compile(r"^\.\. \S+::\s*" + re.escape(name) + r"\s*$", re.M)
    hits = [page for page, text in sources.items() if line.search(text)]
    assert len(hits) == 1, f"{name} should have exactly one entry, found it in {hits}"
    sources[hits[0]] = line.sub("", sources[hits[0]])
    gone = missing(sources)
    assert gone, f"removing {name} went unnoticed"
    assert all(resolve(g) is resolve(name) or g == name for g in gone), gone
