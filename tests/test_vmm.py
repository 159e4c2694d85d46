"""The VMM clients and the runner's vCPU pause and resume, against stand-in VMMs.

``FakeQmp`` is a small QMP server over a real Unix socket that plays the
protocol's awkward parts on purpose (events between a command and its
answer, answers to other ids, error replies, a command that never answers).
A command VMM is a real shell script.  The real QEMU is in tests/test_qemu.py:
these tests pin the protocol edge cases it does not produce on demand.
"""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from orchestrator.backends import backends_for
from orchestrator.cli import main
from orchestrator.engine import Migration
from orchestrator.errors import PlanError
from orchestrator.plan import VmmEndpoint, VmmSpec
from orchestrator.resolve import resolve
from orchestrator.states import DeviceState, Side
from orchestrator.vmm import CommandVmm, QmpVmm, VmmError
from tests.helpers import make_plan, make_resolved, sim_device
from tests.invariants import check_all


class FakeQmp:
    """A QMP monitor with vCPUs that are running or not; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        running: bool = True,
        status: str | None = None,
        hang: tuple[str, ...] = (),
        errors: dict[str, tuple[str, str]] | None = None,
        chatter: bool = True,
        lie_about: tuple[str, ...] = (),
        greeting: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.running = running
        self.status = status or ("running" if running else "paused")
        self.hang = set(hang)
        self.errors = errors or {}
        self.chatter = chatter
        self.lie_about = set(lie_about)
        self.greeting = greeting or {
            "QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 0}}, "capabilities": []}
        }
        self.commands: list[str] = []
        self.connections = 0

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        sock.listen(8)
        await trio.serve_listeners(
            self._client, [trio.SocketListener(sock)], task_status=task_status
        )

    async def _client(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            await self._send(stream, self.greeting)
            buffer = b""
            while True:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    await self._answer(stream, json.loads(line))

    async def _answer(self, stream: trio.SocketStream, request: dict[str, Any]) -> None:
        command, call_id = request["execute"], request.get("id")
        self.commands.append(command)
        if command in self.hang:
            await trio.sleep_forever()
        if self.chatter:
            # An event and a stale answer before the real one, as a busy QEMU may send.
            await self._send(stream, {"event": "RTC_CHANGE", "data": {"offset": 1}})
            await self._send(stream, {"return": {}, "id": "someone-else-1"})
        if command in self.errors:
            cls, desc = self.errors[command]
            await self._send(stream, {"error": {"class": cls, "desc": desc}, "id": call_id})
            return
        result: Any = {}
        event = None
        if command in ("stop", "cont") and command not in self.lie_about:
            self.running = command == "cont"
            self.status = "running" if self.running else "paused"
            event = "RESUME" if self.running else "STOP"
        elif command == "query-status":
            result = {"running": self.running, "singlestep": False, "status": self.status}
        elif command != "qmp_capabilities" and command not in self.lie_about:
            error = {
                "class": "CommandNotFound",
                "desc": f"The command {command} has not been found",
            }
            await self._send(stream, {"error": error, "id": call_id})
            return
        await self._send(stream, {"return": result, "id": call_id})
        if event:
            await self._send(
                stream, {"event": event, "timestamp": {"seconds": 1, "microseconds": 2}}
            )

    @staticmethod
    async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(message).encode() + b"\r\n")


@asynccontextmanager
async def fake_qmps(*fakes: FakeQmp) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for fake in fakes:
            await nursery.start(fake.serve)
        yield
        nursery.cancel_scope.cancel()


def qmp(path: Path) -> QmpVmm:
    return QmpVmm(VmmEndpoint(qmp=path))


def vmm_section(source: Path, destination: Path) -> dict[str, Any]:
    return {"source": {"qmp": str(source)}, "destination": {"qmp": str(destination)}}


def two_devices() -> list[dict[str, Any]]:
    return [sim_device(f"gpu{i}", seed=i, transition_ms=1) for i in range(2)]


# -- the QMP client ----------------------------------------------------------------


async def test_qmp_pause_and_resume_skip_events_and_other_answers(short_dir: Path) -> None:
    fake = FakeQmp(short_dir / "qmp.sock")
    async with fake_qmps(fake):
        vmm = qmp(fake.path)
        try:
            assert (await vmm.status()).running
            paused = await vmm.pause()
            assert (paused.running, paused.status) == (False, "paused")
            assert not fake.running
            resumed = await vmm.resume()
            assert (resumed.running, resumed.status) == (True, "running")
        finally:
            await vmm.aclose()
    assert fake.commands == [
        "qmp_capabilities",
        "query-status",
        "stop",
        "query-status",
        "cont",
        "query-status",
    ]
    assert fake.connections == 1  # one connection for the whole life of the client
    assert vmm.greeting is not None and vmm.greeting["version"]["qemu"]["major"] == 9


async def test_a_qmp_error_names_the_command_class_and_description(short_dir: Path) -> None:
    fake = FakeQmp(
        short_dir / "qmp.sock",
        errors={"cont": ("GenericError", "Migration is not finalized yet")},
    )
    async with fake_qmps(fake):
        vmm = qmp(fake.path)
        with pytest.raises(VmmError) as caught:
            await vmm.resume()
        await vmm.aclose()
    message = str(caught.value)
    assert "QMP cont failed" in message
    assert "GenericError: Migration is not finalized yet" in message
    assert str(fake.path) in message


async def test_stop_that_does_not_stop_is_an_error(short_dir: Path) -> None:
    fake = FakeQmp(short_dir / "qmp.sock", lie_about=("stop",))
    async with fake_qmps(fake):
        vmm = qmp(fake.path)
        with pytest.raises(VmmError, match="query-status still says running"):
            await vmm.pause()
        await vmm.aclose()


async def test_a_call_whose_deadline_passed_leaves_the_client_usable(short_dir: Path) -> None:
    fake = FakeQmp(short_dir / "qmp.sock", hang=("stop",))
    async with fake_qmps(fake):
        vmm = qmp(fake.path)
        # Cancelled once the monitor holds "stop" unanswered (not after a time
        # that a busy machine may spend connecting), as a deadline would.
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vmm.pause)
                await trio.testing.wait_all_tasks_blocked()
                assert fake.commands[-1] == "stop"
                scope.cancel()
        assert scope.cancelled_caught
        fake.hang.clear()
        # The next call starts over on a fresh connection, not mid-answer.
        assert (await vmm.status()).running
        await vmm.aclose()
    assert fake.connections == 2


async def test_not_a_qmp_monitor_and_no_socket_are_clear_errors(short_dir: Path) -> None:
    fake = FakeQmp(short_dir / "qmp.sock", greeting={"hello": "world"})
    async with fake_qmps(fake):
        with pytest.raises(VmmError, match="is not a QMP monitor"):
            await qmp(fake.path).status()
    with pytest.raises(VmmError, match=r"cannot connect to the QMP socket .*missing\.sock"):
        await qmp(short_dir / "missing.sock").status()


# -- a command VMM ----------------------------------------------------------------------


def vmm_script(tmp_path: Path, body: str = "") -> Path:
    """A VMM stand-in: its vCPU state in a file beside it."""
    state = tmp_path / "vcpus"
    state.write_text("running\n")
    script = tmp_path / "vmm.sh"
    script.write_text(
        "#!/bin/sh\n"
        "for verb; do :; done\n"  # the verb comes last, after the VMM's own arguments
        f"state={state}\n"
        f"{body}\n"
        'case "$verb" in\n'
        '  pause) echo paused > "$state" ;;\n'
        '  resume) echo running > "$state" ;;\n'
        '  status) cat "$state" ;;\n'
        '  *) echo "unknown verb $verb" >&2; exit 64 ;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


async def test_a_command_vmm_pauses_resumes_and_reports(tmp_path: Path) -> None:
    vmm = CommandVmm(VmmEndpoint(command=[str(vmm_script(tmp_path))]))
    assert (await vmm.status()).running
    assert (await vmm.pause()).status == "paused"
    assert (tmp_path / "vcpus").read_text() == "paused\n"
    assert (await vmm.resume()).running


async def test_a_failing_command_is_named_with_its_exit_status_and_stderr(tmp_path: Path) -> None:
    script = vmm_script(tmp_path, 'if [ "$verb" = pause ]; then echo "no such VM" >&2; exit 3; fi')
    vmm = CommandVmm(VmmEndpoint(command=[str(script), "--vm", "vm1"]))
    with pytest.raises(VmmError) as caught:
        await vmm.pause()
    assert f"{script} --vm vm1 pause" in str(caught.value)
    assert "exited 3: no such VM" in str(caught.value)


async def test_a_command_status_may_be_a_json_state(tmp_path: Path) -> None:
    script = vmm_script(
        tmp_path,
        'if [ "$verb" = status ]; then echo \'{"config": {}, "state": "Running"}\'; exit; fi',
    )
    status = await CommandVmm(VmmEndpoint(command=[str(script)])).status()
    assert (status.running, status.status) == (True, "Running")


async def test_a_command_status_that_says_nothing_is_an_error(tmp_path: Path) -> None:
    script = vmm_script(tmp_path, 'if [ "$verb" = status ]; then exit 0; fi')
    with pytest.raises(VmmError, match="expected a word such as 'running'"):
        await CommandVmm(VmmEndpoint(command=[str(script)])).status()


# -- the runner --------------------------------------------------------------------------


async def test_the_source_pauses_before_the_barrier_and_the_destination_resumes_last(
    short_dir: Path,
) -> None:
    source = FakeQmp(short_dir / "src.sock")
    destination = FakeQmp(short_dir / "dst.sock", running=False, status="prelaunch")
    async with fake_qmps(source, destination):
        m = Migration(make_resolved(two_devices(), vmm=vmm_section(source.path, destination.path)))
        report = await m.run()
        await check_all(m)
    assert report.outcome == "succeeded", report.error
    assert not source.running and destination.running
    assert source.commands.count("stop") == 1 and "cont" not in source.commands
    assert destination.commands.count("cont") == 1 and "stop" not in destination.commands
    trace = m.trace
    pause_end = next(e for e in trace if e.kind == "vmm_end" and e.detail["action"] == "pause")
    resume_begin = next(
        e for e in trace if e.kind == "vmm_begin" and e.detail["action"] == "resume"
    )
    for e in trace:
        if (
            e.kind == "arc_begin"
            and e.side is Side.SOURCE
            and e.to_state
            in (
                DeviceState.PRE_COPY_P2P,
                DeviceState.STOP_COPY,
            )
        ):
            assert e.seq > pause_end.seq, "a source device left PRE_COPY before the pause"
        if e.kind == "arc_end" and e.side is Side.DESTINATION and e.to_state is DeviceState.RUNNING:
            assert e.seq < resume_begin.seq, "the vCPUs resumed before a device ran"
    assert report.vmm is not None
    assert report.vmm.pause_ms is not None and report.vmm.resume_ms is not None
    assert (report.vmm.source_status, report.vmm.destination_status) == ("paused", "running")
    # The downtime runs from the pause to the resume: both are inside it.
    pause_begin = next(e for e in trace if e.kind == "vmm_begin" and e.detail["action"] == "pause")
    resume_end = next(e for e in trace if e.kind == "vmm_end" and e.detail["action"] == "resume")
    assert report.downtime_ms == pytest.approx(
        (resume_end.time - pause_begin.time) * 1000, abs=1e-3
    )
    assert report.downtime_ms is not None
    assert report.downtime_ms >= report.vmm.pause_ms + report.vmm.resume_ms


async def test_a_rollback_that_cannot_finish_leaves_the_source_vcpus_paused(
    short_dir: Path,
) -> None:
    # gpu0 fails as it stops; gpu1 cannot run fully again on the way back.  A guest
    # resumed beside a device that does not run would find it dead: the vCPUs stay
    # paused, and an operator is needed.
    source = FakeQmp(short_dir / "src.sock")
    destination = FakeQmp(short_dir / "dst.sock", running=False, status="prelaunch")
    devices = [
        sim_device("gpu0", seed=1, transition_ms=1, fault={"at": "STOP_COPY", "kind": "error"}),
        sim_device(
            "gpu1",
            seed=2,
            transition_ms=1,
            fault={"at": "RUNNING_P2P->RUNNING", "kind": "error", "once": False},
        ),
    ]
    async with fake_qmps(source, destination):
        m = Migration(make_resolved(devices, vmm=vmm_section(source.path, destination.path)))
        report = await m.run()
        await check_all(m)
    assert report.outcome == "failed", report.error
    assert not source.running and "cont" not in source.commands
    gpu1 = {d.name: d for d in report.devices}["gpu1"]
    assert gpu1.source_state == "RUNNING_P2P"
    assert any("vCPUs left paused" in n and "gpu1" in n for n in report.notes), report.notes


async def test_a_failure_after_the_pause_resumes_the_source(short_dir: Path) -> None:
    source = FakeQmp(short_dir / "src.sock")
    destination = FakeQmp(short_dir / "dst.sock", running=False, status="prelaunch")
    devices = [
        sim_device("gpu0", seed=1, transition_ms=1),
        sim_device("gpu1", seed=2, transition_ms=1, fault={"at": "STOP_COPY", "kind": "error"}),
    ]
    async with fake_qmps(source, destination):
        m = Migration(make_resolved(devices, vmm=vmm_section(source.path, destination.path)))
        report = await m.run()
        await check_all(m)
    assert report.outcome == "rolled_back"
    assert report.error is not None and report.error.device == "gpu1"
    assert source.running and source.commands.count("cont") == 1
    assert not destination.running and "cont" not in destination.commands
    assert report.vmm is not None and report.vmm.source_resume_ms is not None
    assert report.vmm.source_status == "running"
    # The VM was down from the pause until its vCPUs ran again on the source.
    last = max(
        e.time
        for e in m.trace
        if e.kind == "vmm_end" and e.side is Side.SOURCE and e.detail["action"] == "resume"
    )
    first = min(e.time for e in m.trace if e.kind == "vmm_begin" and e.detail["action"] == "pause")
    assert report.downtime_ms == pytest.approx((last - first) * 1000, abs=1e-3)


async def test_a_pause_that_never_answers_rolls_back_and_resumes(short_dir: Path) -> None:
    source = FakeQmp(short_dir / "src.sock", hang=("stop",))
    destination = FakeQmp(short_dir / "dst.sock", running=False, status="prelaunch")
    async with fake_qmps(source, destination):
        plan_vmm = vmm_section(source.path, destination.path)
        m = Migration(make_resolved(two_devices(), vmm=plan_vmm, timeouts={"vmm_call_s": 0.3}))
        with trio.fail_after(20):
            report = await m.run()
        await check_all(m)
    assert report.outcome == "rolled_back"
    error = report.error
    assert error is not None
    assert (error.kind, error.side, error.operation) == ("vmm_timeout", "source", "pause")
    assert "no answer within 0.3 s" in error.message
    # The stop may have happened: the rollback resumed the source anyway.
    assert source.commands[-2:] == ["cont", "query-status"] and source.running
    # No source device ever stopped.
    assert not any(
        e.kind == "arc_begin" and e.side is Side.SOURCE and e.to_state is DeviceState.STOP_COPY
        for e in m.trace
    )


async def test_a_destination_resume_failure_after_the_commit_never_resumes_the_source(
    short_dir: Path,
) -> None:
    source = FakeQmp(short_dir / "src.sock")
    destination = FakeQmp(
        short_dir / "dst.sock",
        running=False,
        status="prelaunch",
        errors={"cont": ("GenericError", "guest crashed")},
    )
    async with fake_qmps(source, destination):
        m = Migration(make_resolved(two_devices(), vmm=vmm_section(source.path, destination.path)))
        report = await m.run()
    assert report.committed and report.outcome == "failed"
    assert report.error is not None
    assert (report.error.kind, report.error.side) == ("vmm_error", "destination")
    assert "guest crashed" in report.error.message
    assert not source.running and "cont" not in source.commands
    assert all(d.destination_state == "RUNNING" for d in report.devices)
    assert report.downtime_ms is None  # the VM does not run anywhere


@pytest.mark.parametrize(
    ("source_running", "destination_running", "side"),
    [(False, False, "source"), (True, True, "destination")],
)
async def test_vmms_not_where_a_migration_starts_are_refused_before_any_change(
    short_dir: Path, source_running: bool, destination_running: bool, side: str
) -> None:
    source = FakeQmp(short_dir / "src.sock", running=source_running)
    destination = FakeQmp(short_dir / "dst.sock", running=destination_running)
    async with fake_qmps(source, destination):
        m = Migration(make_resolved(two_devices(), vmm=vmm_section(source.path, destination.path)))
        report = await m.run()
    assert report.outcome == "refused"
    assert report.error is not None
    assert (report.error.kind, report.error.side) == ("vmm_state", side)
    assert "nothing was changed" in report.error.message
    assert not any(e.kind == "arc_begin" for e in m.trace)
    assert "stop" not in source.commands and "cont" not in destination.commands


# -- the plan's [vmm] section -----------------------------------------------------------


@pytest.mark.parametrize(
    ("vmm", "path", "message"),
    [
        ({"source": {}, "destination": {"qmp": "/run/d.sock"}}, "vmm.source", "exactly one"),
        (
            {"source": {"qmp": "/run/s.sock", "command": ["x"]}, "destination": {"qmp": "/d"}},
            "vmm.source",
            "exactly one",
        ),
        (
            {"source": {"qmp": "rel.sock"}, "destination": {"qmp": "/d"}},
            "vmm.source.qmp",
            "absolute",
        ),
        (
            {"source": {"qmp": "/" + "x" * 120}, "destination": {"qmp": "/d"}},
            "vmm.source.qmp",
            "at most 107",
        ),
        ({"source": {"qmp": "/s"}, "destination": {"command": []}}, "vmm.destination.command", ""),
        (
            {"source": {"qmp": "/s"}, "destination": {"command": [""]}},
            "vmm.destination.command",
            "empty",
        ),
        ({"source": {"qmp": "/s"}}, "vmm.destination", "required"),
        (
            {"source": {"qmp": "/s", "port": 1}, "destination": {"qmp": "/d"}},
            "vmm.source.port",
            "unknown",
        ),
    ],
)
def test_a_bad_vmm_section_is_refused_with_its_field_path(
    vmm: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(PlanError) as caught:
        make_plan(two_devices(), vmm=vmm)
    problems = {p.path: p.message for p in caught.value.problems}
    assert path in problems, problems
    assert message.lower() in problems[path].lower()


def test_validate_names_every_vmm_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "p.toml"
    plan.write_text(
        'vm = "vm1"\ndowntime_limit_ms = 300\n'
        '[vmm.source]\nqmp = "relative.sock"\n'
        '[vmm.destination]\nqmp = "/run/d.sock"\ncommand = ["ch-remote"]\n'
        '[[devices]]\nname = "gpu0"\nbackend = "simulated"\n'
    )
    assert main(["validate", str(plan)]) == 2
    out = capsys.readouterr().out
    assert "vmm.source.qmp" in out and "absolute" in out
    assert "vmm.destination" in out and "exactly one" in out
    assert "Traceback" not in out


async def test_recovery_before_the_commit_resumes_the_source(short_dir: Path) -> None:
    # The daemon died after pausing the source: a restart rolls back, and the
    # source resumes (resuming running vCPUs would change nothing).
    source = FakeQmp(short_dir / "src.sock", running=False)
    destination = FakeQmp(short_dir / "dst.sock", running=False, status="prelaunch")
    async with fake_qmps(source, destination):
        m = Migration(make_resolved(two_devices(), vmm=vmm_section(source.path, destination.path)))
        report = await m.recover(committed=False, interrupted_phase="stop_copy")
    assert report.outcome == "rolled_back"
    assert source.running and source.commands[-2:] == ["cont", "query-status"]
    assert not destination.running and "cont" not in destination.commands


async def test_recovery_after_the_commit_resumes_the_destination(short_dir: Path) -> None:
    # Persistent devices, migrated once: the state a daemon that died right
    # after the commit (before the vCPU resume) leaves behind.
    backends = backends_for(short_dir / "state")
    plan = make_plan(two_devices())
    first = await Migration(resolve(plan, backends)).run()
    assert first.outcome == "succeeded"
    source = FakeQmp(short_dir / "src.sock", running=False)
    destination = FakeQmp(short_dir / "dst.sock", running=False, status="prelaunch")
    with_vmm = plan.model_copy(
        update={"vmm": VmmSpec.model_validate(vmm_section(source.path, destination.path))}
    )
    async with fake_qmps(source, destination):
        m = Migration(resolve(with_vmm, backends))
        report = await m.recover(committed=True, interrupted_phase="resume")
    assert report.outcome == "succeeded", report.error
    assert destination.running and destination.commands[-2:] == ["cont", "query-status"]
    assert not source.running and "cont" not in source.commands


async def test_a_strict_budget_checks_the_grace_arcs_and_resumes_the_source(
    short_dir: Path,
) -> None:
    source = FakeQmp(short_dir / "src.sock")
    destination = FakeQmp(short_dir / "dst.sock", running=False, status="prelaunch")
    devices = [
        sim_device("gpu0", seed=1, transition_ms=1),
        sim_device(
            "gpu1",
            seed=2,
            transition_ms=1,
            fault={"at": "PRE_COPY_P2P->STOP_COPY", "kind": "delay", "delay_ms": 5000},
        ),
    ]
    vmm = vmm_section(source.path, destination.path)
    async with fake_qmps(source, destination):
        m = Migration(
            make_resolved(devices, vmm=vmm, downtime_limit_ms=1000, downtime_policy="strict")
        )
        report = await m.run()
        await check_all(m)
    assert report.outcome == "rolled_back", report.error
    assert report.error is not None and report.error.kind == "downtime_budget"
    assert report.budget is not None
    steps = [c["step"] for c in report.budget["checks"]]
    assert steps[:3] == ["pause", "grace_arcs", "stop_arcs"], steps
    # With a VMM the window opens at the pause and closes at the source's resume.
    assert source.running and source.commands.count("cont") == 1
    assert report.budget["pause_ms"] == report.downtime_ms is not None
