"""The orchestrator as it is shipped: its sdist and wheel, and the container image's install steps.

* ``python -m build`` makes the sdist and, from the sdist, the wheel; the sdist
  holds the package data, the wheel installs into a fresh virtual environment
  (its dependencies from the package index, through pip's cache), and the
  installed ``orchestrator`` runs ``--version`` and migrates example plans from
  a directory outside the checkout;
* the Dockerfile's two stages run here as the scripts they RUN: the builder's
  ``deploy/docker/build-wheels.sh`` on exactly the files the builder COPYs,
  then ``deploy/docker/install.sh`` into a scratch root (``DESTDIR``), and the
  daemon it installs serves, as the image's uid when the test runs as root,
  with the image's own settings file; the HEALTHCHECK command answers healthy
  and unhealthy when it should.

Only a container engine could check the rest (base image, layers, USER at
run time), and CI has none: test_deploy.py lints the Dockerfile instead.
These tests are slow (builds and pip installs): about a minute with a warm
pip cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator import __version__

from .conftest import TOKEN
from .helpers import tls_identity
from .test_deploy import dockerfile_instructions, exec_form

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKER_DIR = ROOT / "deploy" / "docker"
PLANS = ROOT / "config" / "plans"

#: The image's user, as install.sh creates it.
IMAGE_UID = 10001

#: Files the installed package cannot work without (pyproject's package-data).
PACKAGE_DATA = (
    "orchestrator/default_plan.toml",
    "orchestrator/api/openapi.json",
    "orchestrator/py.typed",
)

#: Left out of the copy of the checkout that is built: local state, not project files.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".lab", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)

pytestmark = pytest.mark.slow


def _skip(reason: str) -> None:
    print(f"skipped: {reason}")
    pytest.skip(reason)


def _run(
    command: list[str | Path],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``command``; on failure, fail the test with its output (unless not ``check``)."""
    result = subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, command))} exited {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment less this checkout's venv and settings: an installed program on its own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ORCHESTRATOR_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    return {**env, **extra}


def _steady_plan(path: Path) -> Path:
    """The two-GPU example plan with nothing dirtied while it runs, written to ``path`` (JSON).

    Whether pre-copy converges under the example's dirty rates depends on
    how fast this machine moves simulated state, which these tests do not
    control: with both cores busy the simulator moved 62 MiB/s against the
    132 MiB/s the plan dirties, and the migration rolled back.  With nothing
    dirtied it converges after its first round at any speed, and the plan
    is otherwise the example's.
    """
    plan = tomllib.loads((PLANS / "two-gpus-one-nic.toml").read_text())
    for device in plan["devices"]:
        device["source"]["dirty_mib_s"] = 0
    path.write_text(json.dumps(plan))
    return path


def _ran_the_embedded_plan(result: subprocess.CompletedProcess[str]) -> None:
    """``orchestrator run`` without a plan ran the embedded one to an honest end.

    The embedded plan dirties state while it runs, so whether its pre-copy
    converges depends on this machine's speed (see :func:`_steady_plan`):
    a rollback for that reason, and no other, is its other honest end.
    """
    output = result.stdout + result.stderr
    first = result.stdout.partition("\n")[0]
    assert first.startswith("VM demo-vm: "), output  # the embedded plan's VM
    if result.returncode == 0:
        assert first.startswith("VM demo-vm: succeeded"), output
    else:
        assert result.returncode == 1 and first.startswith("VM demo-vm: rolled_back"), output
        assert "error (precopy_not_converged, phase precopy)" in result.stdout, output
    for device in ("gpu0", "gpu1", "nic0"):
        assert re.search(rf"^{device}\s", result.stdout, re.M), output


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment at ``path``; its python.  Skips if venv cannot work here."""
    result = subprocess.run(
        [sys.executable, "-m", "venv", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        _skip(f"python -m venv does not work here: {result.stderr.strip()[-300:]}")
    return path / "bin" / "python"


# -- sdist and wheel ---------------------------------------------------------------


@dataclass(frozen=True)
class Dists:
    source: Path  # the copy of the checkout they were built from
    sdist: Path
    wheel: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """``python -m build`` on a copy of the checkout: the sdist, then the wheel from the sdist."""
    if importlib.util.find_spec("build") is None:
        _skip("the 'build' package is not installed (pip install -e '.[test]')")
    work = tmp_path_factory.mktemp("dists")
    source = work / "source"
    # A copy, so the build's egg-info and build/ never land in the checkout.
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    out = work / "dist"
    _run([sys.executable, "-m", "build", "--outdir", out, source], env=_clean_env())
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dists(source, sdist, wheel)


def _package_modules(dists: Dists) -> set[str]:
    """Every module of the package that was built, subpackages' too (``backends/simulated/``)."""
    package = dists.source / "orchestrator"
    return {p.relative_to(dists.source).as_posix() for p in package.rglob("*.py")}


def test_sdist_holds_the_sources_and_the_package_data(dists: Dists) -> None:
    stem = f"passthrough_migration_orchestrator-{__version__}"
    assert dists.sdist.name == f"{stem}.tar.gz"
    with tarfile.open(dists.sdist) as sdist:
        names = {name.removeprefix(f"{stem}/") for name in sdist.getnames()}
    for needed in (*PACKAGE_DATA, "pyproject.toml", "README.md", "orchestrator/cli.py"):
        assert needed in names, f"{needed} is not in {dists.sdist.name}"
    modules = _package_modules(dists)
    assert modules <= names, f"missing from the sdist: {sorted(modules - names)}"


def test_wheel_holds_the_package_and_nothing_else(dists: Dists) -> None:
    assert dists.wheel.name == f"passthrough_migration_orchestrator-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = set(wheel.namelist())
        info = f"passthrough_migration_orchestrator-{__version__}.dist-info"
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    for needed in PACKAGE_DATA:
        assert needed in names, f"{needed} is not in {dists.wheel.name}"
    tops = {name.split("/")[0] for name in names}
    assert tops == {"orchestrator", info}, tops  # no tests/, bench/ or config/ as packages
    modules = _package_modules(dists)
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    assert re.search(r"^orchestrator = orchestrator\.cli:main$", entry_points, re.MULTILINE)


def test_wheel_installs_in_a_fresh_venv_and_runs_plans(
    dists: Dists, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("wheel-venv")
    python = _fresh_venv(work / "venv")
    _run(
        [python, "-m", "pip", "install", "--disable-pip-version-check", dists.wheel],
        env=_clean_env(),
    )
    orchestrator = python.parent / "orchestrator"
    # Away from the checkout, so that nothing can import its sources.
    cwd = work / "elsewhere"
    cwd.mkdir()
    env = _clean_env()

    version = _run([orchestrator, "--version"], cwd=cwd, env=env)
    assert version.stdout.strip() == f"orchestrator {__version__}"

    where = _run(
        [python, "-c", "import orchestrator; print(orchestrator.__file__)"], cwd=cwd, env=env
    )
    assert Path(where.stdout.strip()).is_relative_to(work / "venv")

    plan = _steady_plan(cwd / "two-gpus-one-nic.json")
    ran = _run([orchestrator, "run", plan], cwd=cwd, env=env)
    assert "succeeded" in ran.stdout.splitlines()[0], ran.stdout
    assert "gpu0" in ran.stdout

    # The embedded example plan is package data.
    _ran_the_embedded_plan(_run([orchestrator, "run"], cwd=cwd, env=env, check=False))

    # A plan that rolls back exits 1 with its report, installed as in the checkout.
    fault = _run(
        [orchestrator, "run", "--json", PLANS / "fault-destination-corrupt.toml"],
        cwd=cwd,
        env=env,
        check=False,
    )
    assert fault.returncode == 1, fault.stdout + fault.stderr
    assert '"outcome": "rolled_back"' in fault.stdout

    # The packaged OpenAPI document is the committed one.
    openapi = _run(
        [
            python,
            "-c",
            "import importlib.resources as r; "
            "print(r.files('orchestrator').joinpath('api/openapi.json').read_text(), end='')",
        ],
        cwd=cwd,
        env=env,
    )
    assert openapi.stdout == (dists.source / "orchestrator" / "api" / "openapi.json").read_text()


# -- the container image's steps ------------------------------------------------------


def test_dockerfile_runs_the_scripts_these_tests_run() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 2 and froms[0].args.endswith(" AS builder"), froms
    runs = {i.stage: i.args for i in instructions if i.keyword == "RUN"}
    assert runs[0] == "sh /usr/local/bin/build-wheels.sh /src /wheels"
    assert "sh /tmp/install/install.sh /tmp/wheels" in runs[1]
    assert "source=/wheels,target=/tmp/wheels" in runs[1]  # the builder's wheelhouse


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage: its COPY sources staged as Docker stages them, then build-wheels.sh."""
    work = tmp_path_factory.mktemp("builder")
    src = work / "src"
    instructions = [i for i in dockerfile_instructions(DOCKERFILE.read_text()) if i.stage == 0]
    (workdir,) = (i.args for i in instructions if i.keyword == "WORKDIR")
    assert workdir == "/src"
    for copy in (i for i in instructions if i.keyword == "COPY"):
        *sources, dest = copy.args.split()
        absolute = dest if dest.startswith("/") else f"{workdir}/{dest}"
        if not absolute.startswith(f"{workdir}/"):
            continue  # a script put elsewhere, not a project file
        target = src / os.path.relpath(absolute, workdir)
        for source in sources:
            path = ROOT / source
            if path.is_dir():  # Docker copies a directory's contents
                shutil.copytree(path, target, ignore=_NOT_SOURCE, dirs_exist_ok=True)
            elif dest.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / path.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    wheels = work / "wheels"
    _run(["sh", DOCKER_DIR / "build-wheels.sh", src, wheels], env=_clean_env(PYTHON=sys.executable))
    return wheels


def _image_python() -> tuple[str, int | None]:
    """An interpreter to make the image's environment from, and the uid to run it as.

    In the image, uid 10001 runs the base image's Python.  Here, as root, that
    needs an interpreter the uid may execute (one under /root is not): the
    first of this one's base, /usr/local/bin/python3 and /usr/bin/python3 that
    runs as the uid with ensurepip.  Otherwise the installed image runs as
    ourselves, and the test says so.
    """
    if os.geteuid() != 0:
        print(f"note: not root, the installed image runs as uid {os.geteuid()}, not {IMAGE_UID}")
        return sys.executable, None
    for candidate in (
        os.path.realpath(sys.executable),
        "/usr/local/bin/python3",
        "/usr/bin/python3",
    ):
        if not Path(candidate).is_file():
            continue
        try:
            check = subprocess.run(
                [candidate, "-c", "import sys, ensurepip; sys.exit(sys.version_info < (3, 11))"],
                user=IMAGE_UID,
                group=IMAGE_UID,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                timeout=60,
                check=False,
            )
        except OSError:  # not executable by the uid
            continue
        if check.returncode == 0:
            return candidate, IMAGE_UID
    print(
        f"note: no Python >= 3.11 with ensurepip that uid {IMAGE_UID} may run: "
        "the installed image runs as root here"
    )
    return sys.executable, None


@dataclass(frozen=True)
class ImageRoot:
    """install.sh run with DESTDIR: the image's files under ``root``."""

    root: Path
    log: str
    #: The uid to run the installed commands as (None: as ourselves).
    uid: int | None

    def as_user(self) -> dict[str, Any]:
        """subprocess arguments that run a child as ``uid``."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.uid, "extra_groups": []}

    @property
    def venv(self) -> Path:
        return self.root / "opt" / "orchestrator"

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


@pytest.fixture(scope="module")
def image_root(wheelhouse: Path) -> Iterator[ImageRoot]:
    # Not under pytest's 0700 tmp directory: the image's uid must reach it.
    base = Path(tempfile.mkdtemp(prefix="orch-img-"))
    try:
        base.chmod(0o755)
        root = base / "root"
        etc = root / "etc"
        etc.mkdir(parents=True)
        # The base image's account files, reduced to root: useradd --prefix edits these.
        for name, line in (
            ("passwd", "root:x:0:0:root:/root:/bin/bash"),
            ("group", "root:x:0:"),
            ("shadow", "root:*:19000:0:99999:7:::"),
            ("gshadow", "root:*::"),
        ):
            (etc / name).write_text(line + "\n")
        if shutil.which("useradd") is None or shutil.which("groupadd") is None:
            _skip("useradd/groupadd (Debian's passwd package) are not installed")
        if os.geteuid() != 0:
            _skip("install.sh chowns the state directories to the image's uid: needs root")
        python, uid = _image_python()
        result = _run(
            ["sh", DOCKER_DIR / "install.sh", wheelhouse],
            env=_clean_env(DESTDIR=str(root), PYTHON=python),
        )
        yield ImageRoot(root, result.stdout + result.stderr, uid)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_install_sh_lays_out_the_image(image_root: ImageRoot) -> None:
    root = image_root.root
    assert f"orchestrator {__version__}" in image_root.log  # its own smoke test ran
    passwd = (root / "etc" / "passwd").read_text()
    assert (
        f"orchestrator:x:{IMAGE_UID}:{IMAGE_UID}::/var/lib/orchestrator:/usr/sbin/nologin" in passwd
    )
    assert f"orchestrator:x:{IMAGE_UID}:" in (root / "etc" / "group").read_text()
    for path, mode in (("var/lib/orchestrator", 0o700), ("run/orchestrator", 0o750)):
        st = (root / path).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (IMAGE_UID, IMAGE_UID, mode), path
    config = root / "etc" / "orchestrator" / "orchestrator.toml"
    assert config.read_text() == (DOCKER_DIR / "orchestrator.toml").read_text()
    healthcheck = image_root.bin("orchestrator-healthcheck")
    assert os.access(healthcheck, os.X_OK)
    assert healthcheck.read_text().splitlines()[0] == f"#!{image_root.venv}/bin/python"
    # The Dockerfile finds both commands through PATH.
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    env = " ".join(i.args for i in instructions if i.keyword == "ENV" and i.stage == 1)
    assert "PATH=/opt/orchestrator/bin:$PATH" in env
    assert "ORCHESTRATOR_CONFIG=/etc/orchestrator/orchestrator.toml" in env


def _image_command(image_root: ImageRoot) -> list[str]:
    """ENTRYPOINT + CMD of the Dockerfile, with the image's paths under the scratch root."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    (entrypoint,) = (i.args for i in instructions if i.keyword == "ENTRYPOINT")
    (cmd,) = (i.args for i in instructions if i.keyword == "CMD")
    words = [*exec_form(entrypoint), *exec_form(cmd)]
    assert words[0] == "orchestrator"
    return [str(image_root.bin("orchestrator"))] + [
        str(image_root.root / w.lstrip("/")) if w.startswith("/etc/orchestrator/") else w
        for w in words[1:]
    ]


def test_image_runs_the_embedded_plan(image_root: ImageRoot) -> None:
    # `docker run IMAGE run`: the ENTRYPOINT with "run" for CMD.
    result = subprocess.run(
        [str(image_root.bin("orchestrator")), "run"],
        cwd=image_root.root / "var" / "lib" / "orchestrator",
        env=_clean_env(
            ORCHESTRATOR_CONFIG=str(image_root.root / "etc/orchestrator/orchestrator.toml")
        ),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        **image_root.as_user(),
    )
    _ran_the_embedded_plan(result)


def test_image_daemon_and_its_healthcheck(image_root: ImageRoot) -> None:
    """The image's command serves with the image's settings; the HEALTHCHECK command follows it."""
    root = image_root.root
    secrets = root / "etc" / "orchestrator" / "tokens"
    secrets.mkdir()
    token_file = secrets / "api-tokens"
    token_file.write_text(f"{TOKEN}\n")
    token_file.chmod(0o600)
    wrong = secrets / "wrong-tokens"
    wrong.write_text("not-the-token\n")
    if image_root.uid is not None:
        for path in (token_file, wrong):
            os.chown(path, image_root.uid, image_root.uid)
    # The image's [tls] identity, mounted where its settings say (under the scratch root).
    import trustme  # the test extra's

    identity = tls_identity(trustme.CA(), root / "etc" / "orchestrator" / "tls", "127.0.0.1")
    if image_root.uid is not None:
        for path in (
            identity.cert_file.parent,
            identity.cert_file,
            identity.key_file,
            identity.ca_file,
        ):
            os.chown(path, image_root.uid, image_root.uid)
    plan = _steady_plan(root / "var" / "lib" / "orchestrator" / "plan.json")
    plan.chmod(0o644)
    socket_path = root / "run" / "orchestrator" / "api.sock"
    env = _clean_env(
        # The image's ENV, and what a test must change: its paths and a free port.
        ORCHESTRATOR_CONFIG=str(root / "etc" / "orchestrator" / "orchestrator.toml"),
        ORCHESTRATOR_STATE_DIR=str(root / "var" / "lib" / "orchestrator"),
        ORCHESTRATOR_API__UNIX_SOCKET=str(socket_path),
        ORCHESTRATOR_API__TOKEN_FILE=str(token_file),
        ORCHESTRATOR_API__TCP="127.0.0.1:0",
        ORCHESTRATOR_DATA__LISTEN="127.0.0.1:0",
        ORCHESTRATOR_TLS__CERT_FILE=str(identity.cert_file),
        ORCHESTRATOR_TLS__KEY_FILE=str(identity.key_file),
        ORCHESTRATOR_TLS__CA_FILE=str(identity.ca_file),
    )
    as_image_user = image_root.as_user()
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    (healthcheck,) = (i.args for i in instructions if i.keyword == "HEALTHCHECK")
    probe_words = exec_form(healthcheck.partition(" CMD ")[2])
    probe = [str(image_root.bin(probe_words[0])), *probe_words[1:]]

    def run(command: list[str], **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=240,  # watch waits for the whole migration
            check=False,
            **as_image_user,
        )

    down = run(probe)
    assert down.returncode == 1 and down.stdout.startswith("unhealthy: /healthz"), down.stdout

    log = root / "daemon.log"
    with log.open("w") as log_file:
        daemon = subprocess.Popen(
            _image_command(image_root),
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=root / "var" / "lib" / "orchestrator",
            **as_image_user,
        )
    try:
        # A guard against a daemon that never gets ready, not a target: starting
        # takes seconds, more with every core busy.
        deadline = time.monotonic() + 120
        while (ready := run([*probe, "--ready"])).returncode != 0:
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, ready.stdout + log.read_text()
            time.sleep(0.2)
        assert ready.stdout.startswith("healthy: /readyz"), ready.stdout
        alive = run(probe)
        assert alive.returncode == 0, alive.stdout + alive.stderr
        assert alive.stdout.strip() == f'healthy: /healthz on {socket_path}: 200 {{"status":"ok"}}'

        refused = run([*probe, "--ready"], ORCHESTRATOR_API__TOKEN_FILE=str(wrong))
        assert refused.returncode == 1 and " 403 " in refused.stdout, refused.stdout

        # `docker exec CONTAINER orchestrator submit/watch`: the CLI finds the daemon
        # through ORCHESTRATOR_CONFIG, as the image sets it.
        orchestrator = str(image_root.bin("orchestrator"))
        submitted = run([orchestrator, "submit", "--json", str(plan)])
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        migration_id = re.search(r'"id": "([^"]+)"', submitted.stdout)
        assert migration_id is not None, submitted.stdout
        watched = run([orchestrator, "watch", "--no-progress", migration_id.group(1)])
        assert watched.returncode == 0, watched.stdout + watched.stderr

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text()
    assert "daemon.ready" in text and "Traceback" not in text, text
    assert not socket_path.exists()
    stopped = run(probe)
    assert stopped.returncode == 1 and "no answer" in stopped.stdout, stopped.stdout
