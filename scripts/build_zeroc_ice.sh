#!/usr/bin/env bash
# Build (once per machine) and install zeroc-ice 3.6.5, which omero-py 5.23 needs.
#
# PyPI has only the 3.6.5 source distribution, and it does not compile on Python 3.11 as shipped.
# This script downloads it, checks its sha256, applies the two one-line fixes (idempotently),
# builds a wheel with `pip wheel`, keeps the wheel in ${XDG_CACHE_HOME:-~/.cache}/omero-hwsi/wheels
# and installs it from there with --find-links, so pip never tries the unpatched source again.
# The build takes about 13 minutes (one extension, compiled one file at a time).
#
# Usage: scripts/build_zeroc_ice.sh [PYTHON]    (default: .venv/bin/python, else python3)
set -euo pipefail

VERSION=3.6.5
SHA256=4235ffeb605bcd4e22e716577f7d61e4aa1bc82f65276bb542701a81b7933356
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHEELS=${XDG_CACHE_HOME:-$HOME/.cache}/omero-hwsi/wheels
TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

say() { echo "build_zeroc_ice: $*" >&2; }

installed=$("$PY" -c 'import importlib.metadata as m; print(m.version("zeroc-ice"))' 2>/dev/null || true)
if [ "$installed" = "$VERSION" ] && "$PY" -c 'import Ice' 2>/dev/null; then
    say "zeroc-ice $VERSION is already installed in $PY"
    exit 0
fi

mkdir -p "$WHEELS"
wheel=$(ls "$WHEELS"/zeroc_ice-"$VERSION"-"$TAG"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    say "downloading the zeroc-ice $VERSION source distribution"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "zeroc-ice==$VERSION" -d "$work"
    sdist="$work/zeroc-ice-$VERSION.tar.gz"
    echo "$SHA256  $sdist" | sha256sum --check --quiet - \
      || { say "$sdist: sha256 does not match $SHA256; refusing to build it"; exit 1; }
    tar -xzf "$sdist" -C "$work"
    src="$work/zeroc-ice-$VERSION"
    # The two Python 3.11 fixes; each sed matches only the unpatched line, so reruns change nothing.
    sed -i 's|#include <eval.h>|#include <Python.h>|' "$src/src/Slice.cpp"
    sed -i 's|PyThreadState_GET()->frame|PyEval_GetFrame()|' "$src/src/Util.cpp"
    grep -q '#include <Python.h>' "$src/src/Slice.cpp" && grep -q 'PyEval_GetFrame()' "$src/src/Util.cpp" \
      || { say "the source no longer has the lines the fixes expect"; exit 1; }
    say "building the wheel (about 13 minutes on 2 cores; once per machine)"
    "$PY" -m pip wheel --quiet --no-deps "$src" -w "$work/dist"
    built=$(ls "$work"/dist/zeroc_ice-*.whl)
    mv "$built" "$WHEELS/"  # the cache holds only finished wheels
    wheel="$WHEELS/$(basename "$built")"
    say "cached $wheel"
fi
"$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "zeroc-ice==$VERSION"
"$PY" -c 'import Ice' && say "installed zeroc-ice $VERSION from $wheel"
