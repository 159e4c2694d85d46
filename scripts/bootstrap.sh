#!/bin/sh
# Make .venv with the orchestrator installed in it.
#   scripts/bootstrap.sh        the orchestrator and what it needs to run
#   scripts/bootstrap.sh test   the same, plus the test and lint tools
# Works on a fresh Debian 12: python3 is there, but its venv module lives in
# the python3-venv package, which this installs when it is missing (as root).
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: $python is older than Python 3.11" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$python" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "bootstrap: installing python3-venv" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$python" -m venv .venv
        else
            echo "bootstrap: '$python -m venv' failed; install python3-venv (as root)" >&2
            exit 1
        fi
    fi
fi
extras=""
[ "${1:-}" = test ] && extras="[test]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$extras"
