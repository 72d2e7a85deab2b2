"""Sphinx configuration of ckpt's documentation (user guide, API reference, benchmarks).

Build:  python -m sphinx -W --keep-going -b html docs docs/_build/html
Examples:  python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest
The build imports the installed ckpt (pip install '.[docs]'); it never runs a benchmark.
"""
from __future__ import annotations

import ckpt

project = "ckpt"
author = "ckpt developers"
copyright = "ckpt developers, MIT License"
release = ckpt.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "benchmarks/results/*.md"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# Today's docstrings are prose, not yet numpydoc sections: show what autodoc finds and let the
# reference pages list members explicitly rather than numpydoc's generated member tables.
numpydoc_show_class_members = False
numpydoc_validation_checks: set[str] = set()
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}

doctest_global_setup = """
import numpy as np
import ckpt
ckpt.set_num_threads(1)
"""

html_theme = "pydata_sphinx_theme"
html_title = f"ckpt {release}"
html_static_path = ["_static"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
