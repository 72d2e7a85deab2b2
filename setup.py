"""Build the Cython extensions of ckpt against the OpenBLAS of the scipy-openblas32 wheel.

Every ``src/ckpt/*.pyx`` becomes the extension ``ckpt.<name>``.

A release build (the default) is portable and small: no bounds checks, no debug information
(``-g0`` after the interpreter's ``-g``, and ``--strip-debug`` at link time), no ``-march=native``,
and a RUNPATH of exactly ``$ORIGIN/../scipy_openblas32/lib``: every ``-rpath`` in the link command
(sysconfig's LDFLAGS put the interpreter's library folder there) and the ``-L`` to the interpreter's
own folders are filtered out.

Every build compiles without floating-point contraction (``-ffp-contract=off``: no fused
multiply-add): the AVX-512 copies of the elementwise kernels (``src/ckpt/_simd.h``) could fuse
where the baseline copy cannot, and every copy must compute the same values. Nor does any build
keep floating-point exceptions observable (``-fno-trapping-math``; ckpt never reads the FP
status flags, and the values are the same): otherwise gcc may not compute a product before
knowing it is wanted, and ``g * (v > 0 ? 1 : alpha)`` (the ReLU delta) becomes a branch per
value, mispredicted on every other one.

Set ``CKPT_DEBUG_CYTHON=1`` for a debug build: bounds, wraparound and initialisation checks back on,
and ``-g -Og`` so gdb can step through the kernels.
"""
import os
import shlex
import sysconfig
from pathlib import Path

import numpy as np
import scipy_openblas32
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

DEBUG = os.environ.get("CKPT_DEBUG_CYTHON", "0") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
}

# The only RUNPATH entry: the installed scipy-openblas32 wheel's library folder, next to ckpt/.
RUNPATH = "$ORIGIN/../scipy_openblas32/lib"

# Flags that tie a binary to the CPU it was built on: never in a release build.
HOST_SPECIFIC = ("-march=native", "-mtune=native", "-mcpu=native")

if DEBUG:
    # -O3 from the interpreter's flags comes first; the last -O wins.
    COMPILE_ARGS = ["-g", "-Og", "-ffp-contract=off", "-fno-trapping-math"]
    LINK_ARGS = []
else:
    # No errno from libm: lets gcc vectorise sqrt/exp loops; ckpt never reads errno.
    COMPILE_ARGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fno-trapping-math", "-g0"]
    LINK_ARGS = ["-Wl,--strip-debug"]


def _interpreter_link_dirs() -> set:
    """The interpreter's library folders: LIBDIR and the -L folders of its sysconfig link flags."""
    flags = []
    for var in ("LDSHARED", "LDFLAGS", "CONFIGURE_LDFLAGS", "PY_LDFLAGS"):
        flags += shlex.split(sysconfig.get_config_var(var) or "")
    dirs = {sysconfig.get_config_var("LIBDIR") or ""}
    for flag in flags:
        if flag.startswith("-L"):
            dirs.add(flag[2:])
    return {os.path.normpath(d) for d in dirs if d}


def _without_rpath_in_wl(flag: str) -> str:
    """Drop ``-rpath DIR``, ``-rpath=DIR`` and ``-R DIR`` from one ``-Wl,a,b,...`` flag ('' if empty)."""
    parts = flag.split(",")[1:]
    kept = []
    skip_next = False
    for part in parts:
        if skip_next:
            skip_next = False
        elif part in ("-rpath", "--rpath", "-R"):
            skip_next = True
        elif not part.startswith(("-rpath=", "--rpath=")):
            kept.append(part)
    return ",".join(["-Wl"] + kept) if kept else ""


def clean_link_command(command: list, interpreter_dirs: set) -> list:
    """The linker command without rpaths and without -L to the interpreter's own folders.

    ``runtime_library_dirs`` adds RUNPATH back afterwards, as its only entry; -L folders that the
    extension needs (scipy-openblas32's) are added by ``library_dirs``, not taken from here.
    """
    cleaned = []
    for flag in command:
        if flag.startswith("-Wl,"):
            flag = _without_rpath_in_wl(flag)
        elif flag.startswith("-L") and os.path.normpath(flag[2:]) in interpreter_dirs:
            flag = ""
        elif flag.startswith("-R"):
            flag = ""
        if flag:
            cleaned.append(flag)
    return cleaned


class CleanBuildExt(build_ext):
    """build_ext whose compiler carries none of the build machine's paths or CPU flags."""

    def build_extensions(self) -> None:
        compiler = self.compiler
        interpreter_dirs = _interpreter_link_dirs()
        for attr in ("linker_so", "linker_so_cxx"):
            if getattr(compiler, attr, None):
                setattr(compiler, attr, clean_link_command(getattr(compiler, attr), interpreter_dirs))
        # build_ext itself adds the interpreter's LIBDIR when Python is a shared build.
        compiler.set_library_dirs(
            [d for d in compiler.library_dirs if os.path.normpath(d) not in interpreter_dirs]
        )
        if not DEBUG:
            for attr in ("compiler_so", "compiler_so_cxx", "linker_so", "linker_so_cxx"):
                if getattr(compiler, attr, None):
                    setattr(compiler, attr, [f for f in getattr(compiler, attr) if f not in HOST_SPECIFIC])
        super().build_extensions()


class SourceSdist(sdist):
    """sdist of the sources: no C generated from a .pyx (the build regenerates it), and the tests'
    conftest.py beside the test files that setuptools picks up by default."""

    def make_distribution(self) -> None:
        # The file list is settled by egg_info's manifest maker; adjust it just before archiving.
        generated = {
            str(pyx.with_suffix(".c").relative_to(here)) for pyx in (here / "src" / "ckpt").glob("*.pyx")
        }
        self.filelist.files = [f for f in self.filelist.files if os.path.normpath(f) not in generated]
        if (here / "tests" / "conftest.py").exists() and "tests/conftest.py" not in self.filelist.files:
            self.filelist.append("tests/conftest.py")
        super().make_distribution()


here = Path(__file__).parent


def _is_glibc_x86_64() -> bool:
    """The wheel's glibc floor: on x86_64 glibc, _glibc_compat.h binds the pthread symbols that
    glibc 2.32/2.34 re-versioned to their original versions (see the header), and libpthread.so.0
    is linked for the systems where they still live there. Everywhere else nothing changes."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):  # not a glibc system (musl has no such name)
        return False
    return sysconfig.get_platform() == "linux-x86_64" and libc.startswith("glibc")


GLIBC_X86_64 = _is_glibc_x86_64()
if GLIBC_X86_64:
    COMPILE_ARGS = COMPILE_ARGS + ["-include", "src/ckpt/_glibc_compat.h"]
    # NEEDED libpthread.so.0 even where the linker resolves the symbols in libc (glibc >= 2.34).
    LINK_ARGS = LINK_ARGS + ["-Wl,--push-state,--no-as-needed", "-l:libpthread.so.0", "-Wl,--pop-state"]

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
        runtime_library_dirs=[RUNPATH],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
        # Rebuild when a header changes (_simd.h includes _simd_variants.h and _simd_kernels.h,
        # which Cython never sees).
        depends=[str(h.relative_to(here)) for h in sorted((here / "src" / "ckpt").glob("*.h"))],
    )
    for pyx in sorted((here / "src" / "ckpt").glob("*.pyx"))
]

# The generated C depends on the directives, which cythonize's timestamp check does not see:
# regenerate when the build switches between debug and release.
mode_stamp = here / "build" / "cython-mode"
mode = "debug" if DEBUG else "release"
force = not mode_stamp.exists() or mode_stamp.read_text() != mode

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, force=force),
    cmdclass={"build_ext": CleanBuildExt, "sdist": SourceSdist},
)
mode_stamp.parent.mkdir(exist_ok=True)
mode_stamp.write_text(mode)
