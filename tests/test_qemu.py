"""Migrations beside real QEMU processes as the source and destination VMMs.

Two ``qemu-system-x86_64`` (Debian package ``qemu-system-x86``; TCG, no
disk: the guest sits in its firmware, which is all a vCPU pause needs) with
QMP on Unix sockets: the source started running, the destination with ``-S``
(stopped, as a destination waits for its VM).  The plans' devices are
simulated; the vCPUs are QEMU's.  What each test asserts about the vCPUs it
reads from QEMU itself, over a QMP connection of its own.  Without QEMU, and
without a way to install it, the tests skip and say why.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from tests.helpers import debian_tool

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    return debian_tool(QEMU, "qemu-system-x86", 900)


def qmp_query(path: Path, command: str = "query-status") -> Any:
    """One QMP command on a fresh connection of the test's own (not the orchestrator's code)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        reader = sock.makefile("rb")
        json.loads(reader.readline())  # the greeting
        for execute in ("qmp_capabilities", command):
            sock.sendall(json.dumps({"execute": execute, "id": execute}).encode() + b"\n")
            while True:
                message = json.loads(reader.readline())
                if message.get("id") == execute:
                    break
        return message["return"]


@dataclass
class Qemu:
    process: subprocess.Popen[bytes]
    qmp: Path

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = qmp_query(self.qmp)
        return answer


def start_qemu(binary: str, qmp: Path, *, paused: bool) -> Qemu:
    argv = [
        binary,
        "-machine", "q35,accel=tcg",
        "-nodefaults", "-nographic", "-display", "none",
        "-m", "64",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip
    if paused:
        argv.append("-S")
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    # Ready once it accepts a connection: the socket file appears when QEMU
    # binds it, a moment before it listens (refused in between, on a busy machine).
    while not _accepts(qmp):
        if process.poll() is not None:
            assert process.stderr is not None
            pytest.fail(f"{binary} exited {process.returncode}: {process.stderr.read().decode()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{binary} did not accept QMP connections on {qmp} within 30 s")
        time.sleep(0.02)
    return Qemu(process, qmp)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def stop_qemu(qemu: Qemu) -> None:
    qemu.process.terminate()
    try:
        qemu.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        qemu.process.kill()
        qemu.process.wait(timeout=10)
    if qemu.process.stderr is not None:
        qemu.process.stderr.close()


@pytest.fixture
def vmms(qemu_binary: str, short_dir: Path) -> Iterator[tuple[Qemu, Qemu]]:
    source = start_qemu(qemu_binary, short_dir / "src.qmp", paused=False)
    try:
        destination = start_qemu(qemu_binary, short_dir / "dst.qmp", paused=True)
        try:
            yield source, destination
        finally:
            stop_qemu(destination)
    finally:
        stop_qemu(source)


def write_plan(directory: Path, source: Qemu, destination: Qemu, gpu1: str = "") -> Path:
    plan = directory / "plan.toml"
    plan.write_text(
        f"""
vm = "vm-qemu"
downtime_limit_ms = 300

[vmm.source]
qmp = "{source.qmp}"

[vmm.destination]
qmp = "{destination.qmp}"

[[devices]]
name = "gpu0"
backend = "simulated"
source = {{ state_mib = 1, dirty_mib_s = 1, transition_ms = 2, seed = 1 }}

[[devices]]
name = "gpu1"
backend = "simulated"
source = {{ state_mib = 1, dirty_mib_s = 1, transition_ms = 2, seed = 2 {gpu1} }}
"""
    )
    return plan


def run_json(plan: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = main(["--log-level", "warning", "run", "--json", str(plan)])
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, report


def test_the_source_ends_paused_and_the_destination_running(
    vmms: tuple[Qemu, Qemu], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, destination = vmms
    assert source.status()["running"] is True
    assert destination.status()["status"] == "prelaunch"
    code, report = run_json(write_plan(short_dir, source, destination), capsys)
    assert code == 0, report["error"]
    assert report["outcome"] == "succeeded"
    # What QEMU itself says, not what the orchestrator reports.
    assert source.status() == {"running": False, "singlestep": False, "status": "paused"}
    assert destination.status()["running"] is True
    vmm = report["vmm"]
    assert vmm["source"] == f"qmp:{source.qmp}"
    assert (vmm["source_status"], vmm["destination_status"]) == ("paused", "running")
    assert vmm["pause_ms"] > 0 and vmm["resume_ms"] > 0 and vmm["source_resume_ms"] is None
    # The downtime covers the vCPUs: both VMM calls lie inside it.
    assert report["downtime_ms"] >= vmm["pause_ms"] + vmm["resume_ms"]
    print(
        f"QEMU under TCG: pause (stop + query-status) {vmm['pause_ms']:.2f} ms, "
        f"resume (cont + query-status) {vmm['resume_ms']:.2f} ms, "
        f"downtime {report['downtime_ms']:.2f} ms"
    )


def test_a_failure_after_the_pause_leaves_the_source_running_again(
    vmms: tuple[Qemu, Qemu], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, destination = vmms
    # gpu1 fails as it stops: after the vCPUs were paused, before the commit.
    fault = ', fault = { at = "STOP_COPY", kind = "error" }'
    code, report = run_json(write_plan(short_dir, source, destination, fault), capsys)
    assert code == 1
    assert report["outcome"] == "rolled_back" and not report["committed"]
    assert report["error"]["device"] == "gpu1" and report["error"]["phase"] == "stop_copy"
    assert source.status()["running"] is True
    assert destination.status()["status"] == "prelaunch"
    vmm = report["vmm"]
    assert vmm["pause_ms"] > 0 and vmm["resume_ms"] is None and vmm["source_resume_ms"] > 0
    assert vmm["source_status"] == "running"
    assert all(d["source_state"] == "RUNNING" for d in report["devices"])


def test_a_vm_that_is_not_running_is_refused_before_any_change(
    vmms: tuple[Qemu, Qemu], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, destination = vmms
    qmp_query(source.qmp, "stop")
    code, report = run_json(write_plan(short_dir, source, destination), capsys)
    assert code == 4 and report["outcome"] == "refused"
    assert report["error"]["kind"] == "vmm_state" and report["error"]["side"] == "source"
    assert "'paused'" in report["error"]["message"]
    assert destination.status()["status"] == "prelaunch"
    # Refused before any device was opened: where they stand is not known here.
    assert all(d["source_state"] == "unknown" for d in report["devices"])
