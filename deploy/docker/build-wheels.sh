#!/bin/sh
# The container image's builder stage: the orchestrator's wheel and a wheel of
# every dependency, so that the final stage installs with no index at all.
# tests/test_packaging.py runs this very script.
#
#   build-wheels.sh SOURCE_DIR WHEELHOUSE
#
# PYTHON picks the interpreter (default: python3).  pip builds the project with
# setuptools in an isolated environment (pyproject.toml's build-system) and
# takes the dependencies' wheels from its index or its cache.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 SOURCE_DIR WHEELHOUSE" >&2; exit 2; }
source_dir=$1
wheelhouse=$2
python=${PYTHON:-python3}

mkdir -p "$wheelhouse"
"$python" -m pip wheel --disable-pip-version-check --no-input --wheel-dir "$wheelhouse" "$source_dir"
# Every requirement must have come as a wheel: the final stage has no compiler.
if find "$wheelhouse" -name '*.tar.gz' | grep -q .; then
    echo "build-wheels: a dependency came as an sdist, not a wheel:" >&2
    find "$wheelhouse" -name '*.tar.gz' >&2
    exit 1
fi
