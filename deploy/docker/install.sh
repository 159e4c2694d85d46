#!/bin/sh
# The container image's install step: the Dockerfile's final stage RUNs it, and
# tests/test_packaging.py runs this very script into a scratch DESTDIR.
#
#   install.sh WHEELHOUSE
#
# WHEELHOUSE holds the wheels build-wheels.sh made.  Installs, under DESTDIR
# (default: /, the image):
#   /opt/orchestrator                   a virtual environment with the orchestrator,
#                                       installed from WHEELHOUSE only (no index)
#   /opt/orchestrator/bin/orchestrator-healthcheck   the HEALTHCHECK and probe command
#   /etc/orchestrator/orchestrator.toml the image's settings (deploy/docker/orchestrator.toml)
#   user and group "orchestrator", uid and gid ORCHESTRATOR_UID (default 10001),
#   owner of /var/lib/orchestrator (state, 0700) and /run/orchestrator (socket, 0750)
# PYTHON picks the interpreter the environment is made from (default: python3).
set -eu
[ $# -eq 1 ] || { echo "usage: $0 WHEELHOUSE" >&2; exit 2; }
wheelhouse=$1
here=$(cd "$(dirname "$0")" && pwd)
destdir=${DESTDIR:-}
python=${PYTHON:-python3}
uid=${ORCHESTRATOR_UID:-10001}
venv=$destdir/opt/orchestrator

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input --no-cache-dir \
    --no-index --find-links "$wheelhouse" passthrough-migration-orchestrator
# The probe runs with the environment's interpreter: it reads the daemon's settings.
sed "1s|^#!.*|#!$venv/bin/python|" "$here/healthcheck.py" >"$venv/bin/orchestrator-healthcheck"
chmod 0755 "$venv/bin/orchestrator-healthcheck"
# Fail the build, not the first start, if the install cannot run.
"$venv/bin/orchestrator" --version

# A fixed, high uid: no clash with the host's users when files are shared with it.
# useradd --prefix edits DESTDIR's /etc/passwd and /etc/group, not the running system's.
if [ -n "$destdir" ]; then set -- --prefix "$destdir"; else set --; fi
groupadd "$@" --gid "$uid" orchestrator
useradd "$@" --uid "$uid" --gid "$uid" --no-create-home --home-dir /var/lib/orchestrator \
    --shell /usr/sbin/nologin orchestrator

install -d -m 0755 "$destdir/etc/orchestrator"
install -m 0644 "$here/orchestrator.toml" "$destdir/etc/orchestrator/orchestrator.toml"
install -d -m 0700 -o "$uid" -g "$uid" "$destdir/var/lib/orchestrator"
install -d -m 0750 -o "$uid" -g "$uid" "$destdir/run/orchestrator"
