#!/usr/bin/env bash
# Build ckpt's extensions with AddressSanitizer and UndefinedBehaviorSanitizer, in a copy of the
# working tree under a temporary folder, and run the tests that exercise the compiled code.
#
#   tools/sanitize.sh                 # a fresh venv in the temporary folder (needs the package index)
#   SANITIZE_PYTHON=.venv/bin/python tools/sanitize.sh
#                                     # reuse a Python that has ckpt's build and test dependencies
#   tools/sanitize.sh -x -k adam      # extra arguments go to pytest
#
# Python itself is not instrumented, so libasan is preloaded (it must come first in the process)
# with libstdc++ (whose operator new/delete ASan intercepts). Leak detection is off: CPython keeps
# interned objects and arenas until exit by design. Any ASan or UBSan report aborts the run with a
# non-zero status (halt_on_error, -fno-sanitize-recover). None of the tests below spawns a
# subprocess; a test that does must give it the same LD_PRELOAD or be left out of this list.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
TESTS=(tests/test_kernels.py tests/test_checkpoint.py tests/test_threads.py tests/test_io.py
       tests/test_dense.py tests/test_tracker.py tests/test_deep.py tests/test_torch_parity.py
       tests/test_split.py tests/test_bad_input_battery.py tests/test_interrupt.py
       tests/test_simd.py tests/test_keep_internals.py tests/test_accumulate.py
       tests/test_registry.py)

work="$(mktemp -d "${TMPDIR:-/tmp}/ckpt-sanitize.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# The working tree as it is (uncommitted edits included), without built files.
mkdir "$work/ckpt"
(cd "$root" && tar cf - --exclude='*.so' --exclude='*.c' --exclude=__pycache__ \
    setup.py pyproject.toml README.md src tests) | (cd "$work/ckpt" && tar xf -)

if [[ -n "${SANITIZE_PYTHON:-}" ]]; then
    python="$(cd "$root" && realpath -s "$SANITIZE_PYTHON")"   # -s: keep the venv's symlink
else
    python3 -m venv "$work/venv"
    python="$work/venv/bin/python"
    openblas="$(grep -o '"scipy-openblas32==[^"]*"' "$root/pyproject.toml" | head -1 | tr -d '"')"
    "$python" -m pip install -q "setuptools>=77" "Cython>=3" "numpy>=2" "$openblas" "tqdm>=4.60" \
        "pytest>=7" "hypothesis>=6" "threadpoolctl>=3.5"
fi

asan="$(gcc -print-file-name=libasan.so)"
cxx="$(gcc -print-file-name=libstdc++.so)"
for lib in "$asan" "$cxx"; do
    [[ -e "$lib" ]] || { echo "sanitize.sh: $lib not found (gcc with libasan needed)" >&2; exit 2; }
done

echo "building with -fsanitize=address,undefined in $work/ckpt"
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
(cd "$work/ckpt" && CC=gcc CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
    "$python" setup.py -q build_ext --inplace -j 2 >"$work/build.log" 2>&1) \
    || { tail -30 "$work/build.log" >&2; exit 2; }
for so in "$work"/ckpt/src/ckpt/*.so; do
    readelf -d "$so" | grep -q 'libasan' \
        || { echo "sanitize.sh: $so is not linked with libasan" >&2; exit 2; }
done
echo "built in $((SECONDS - start)) s"

cd "$work/ckpt"
export PYTHONPATH="$work/ckpt/src"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
LD_PRELOAD="$asan $cxx" "$python" -c "
import ckpt, sys
assert ckpt.__file__.startswith('$work'), ckpt.__file__
print('testing', ckpt.__file__)
"
status=0
LD_PRELOAD="$asan $cxx" "$python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@" || status=$?
echo "sanitize.sh: $((SECONDS - start)) s in all, pytest status $status"
exit "$status"
