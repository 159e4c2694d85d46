"""Plan builders shared by the tests."""

from __future__ import annotations

import datetime
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from orchestrator.flow import Phase
from orchestrator.plan import Plan, parse_plan
from orchestrator.resolve import ResolvedPlan, resolve
from orchestrator.transport.channel import TlsIdentity

if TYPE_CHECKING:
    import trustme


def sim_device(
    name: str, *, destination: dict[str, Any] | None = None, **source: Any
) -> dict[str, Any]:
    """A simulated device entry; keyword arguments are source parameters."""
    return {
        "name": name,
        "backend": "simulated",
        "source": {"state_mib": 0.0625, **source},
        "destination": destination or {},
    }


def tls_identity(
    ca: trustme.CA,
    folder: Path,
    *hosts: str,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> TlsIdentity:
    """A host's [tls] identity as files in ``folder`` (made if need be; a second call
    rotates them): a certificate for ``hosts`` signed by ``ca``, its key, the CA."""
    cert = ca.issue_cert(*hosts, not_before=not_before, not_after=not_after)
    folder.mkdir(exist_ok=True)
    identity = TlsIdentity(folder / "cert.pem", folder / "key.pem", folder / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(str(identity.cert_file))
    cert.private_key_pem.write_to_path(str(identity.key_file))
    ca.cert_pem.write_to_path(str(identity.ca_file))
    return identity


def make_plan(devices: list[dict[str, Any]], **top: Any) -> Plan:
    data: dict[str, Any] = {"vm": "vm-test", "downtime_limit_ms": 500, **top, "devices": devices}
    return parse_plan(data)


def make_resolved(devices: list[dict[str, Any]], **top: Any) -> ResolvedPlan:
    return resolve(make_plan(devices, **top))


ROOT = Path(__file__).resolve().parent.parent

#: The phases a successful migration enters, in order (PREPARE is where it starts).
SUCCESS_PHASES = [p.value for p in Phase if p not in (Phase.PREPARE, Phase.ROLLBACK)]


def spawn_child(module: str, *args: str | Path) -> subprocess.Popen[str]:
    """Run ``python -m <module> <args>`` from the checkout, its output piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str]) -> str:
    """The child's next output line; fails the test with its stderr if it died."""
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        pytest.fail(f"the child died: {proc.stderr.read()}")
    return line.strip()


def kill_child(proc: subprocess.Popen[str]) -> list[str]:
    """SIGKILL the child; the lines it printed that were not read yet."""
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert proc.stdout is not None and proc.stderr is not None
    rest = proc.stdout.read().splitlines()
    proc.stdout.close()
    proc.stderr.close()
    return rest


def _apt_install(package: str, timeout_s: int) -> str:
    """Install a Debian package; why not, if it cannot."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return f"not root, cannot apt-get install {package}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for the dpkg lock rather than fail while another apt-get runs.
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=120"]
    install = [*apt, "install", "-y", "--no-install-recommends", package]

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)

    result = run(install)
    if result.returncode != 0:
        # The package lists may be missing or stale: refresh them once and retry.
        run([*apt, "update"])
        result = run(install)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return f"apt-get failed: {' '.join(tail)}"
    return f"still not on PATH after installing {package}"


def debian_tool(binary: str, package: str, timeout_s: int) -> str:
    """The path of ``binary``, installing Debian's ``package`` (as root) if it is
    missing; else the test is skipped, saying why."""
    path = shutil.which(binary)
    if path is None:
        reason = _apt_install(package, timeout_s)
        path = shutil.which(binary)
        if path is None:
            print(f"{binary} not available: {reason}")
            pytest.skip(f"{binary} not available: {reason}")
    return path


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (bench/ is no package), for its tests."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
