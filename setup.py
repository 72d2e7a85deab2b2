"""Build the Cython extensions of ckpt against the OpenBLAS of the scipy-openblas32 wheel.

Every ``src/ckpt/*.pyx`` becomes the extension ``ckpt.<name>``. Set ``CKPT_DEBUG_CYTHON=1`` to
turn bounds checking back on for a debug build.
"""
import os
from pathlib import Path

import numpy as np
import scipy_openblas32
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("CKPT_DEBUG_CYTHON", "0") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
}

here = Path(__file__).parent
extensions = [
    Extension(
        f"ckpt.{pyx.stem}",
        [str(pyx.relative_to(here))],
        include_dirs=[np.get_include(), scipy_openblas32.get_include_dir(), "src/ckpt"],
        library_dirs=[scipy_openblas32.get_lib_dir()],
        libraries=[scipy_openblas32.get_library()],
        # Never an absolute rpath: under pip's build isolation it would point into a deleted
        # temporary folder. ckpt/__init__.py imports scipy_openblas32 first, which preloads the
        # library; the relative rpath finds the installed wheel's copy as a fallback.
        runtime_library_dirs=["$ORIGIN/../scipy_openblas32/lib"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        # No errno from libm: lets gcc vectorise sqrt/exp loops; ckpt never reads errno.
        extra_compile_args=["-O3", "-fno-math-errno"],
    )
    for pyx in sorted((here / "src" / "ckpt").glob("*.pyx"))
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
