"""Initial data that comes back: a source device that reports new initial data
mid pre-copy, after its first had drained.

The switchover acknowledgement is asked for again, no device leaves pre-copy
before the destination gave it, and a destination that never gives it in time
rolls the migration back, on one host and between two daemons.  The devices
are simulated (``reinit_mib``); the VFIO side (the run-time probe of the
pre-copy information's second version, the opt-in and the flag) is tested
against the fake kernel of ``tests/test_vfio.py``.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from pydantic import ValidationError

from orchestrator.backends import vfio_uapi as uapi
from orchestrator.backends.simulated import SimulatedDevice, SimulatedParams
from orchestrator.engine import Migration, TraceEvent
from orchestrator.engine.destination import LocalDestination
from orchestrator.errors import DeviceError
from orchestrator.peer.server import IncomingMigration
from orchestrator.plan import problems_from_validation
from orchestrator.states import Capabilities, DeviceState, Side
from orchestrator.transport import new_secret, open_channel
from tests.channel_helpers import serving
from tests.helpers import make_resolved, sim_device
from tests.invariants import check_acknowledged_before_the_switchover, check_all
from tests.test_vfio import FakeKernel, fake_device
from tests.two_daemons import Host, cross_plan, ended, two_daemons, until

S = DeviceState
KIB = 1024
MIB = 1024 * 1024

#: The switchover's first arcs out of pre-copy: to the grace state, or a stop.
#: (A rollback's PRE_COPY -> RUNNING is none.)
SWITCHOVER_ARCS = {
    (S.PRE_COPY, S.PRE_COPY_P2P),
    (S.PRE_COPY, S.STOP_COPY),
    (S.PRE_COPY_P2P, S.STOP_COPY),
}
SWITCHOVER_NAMES = {(a.name, b.name) for a, b in SWITCHOVER_ARCS}


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# --- the simulated device ------------------------------------------------------------------


async def drain(device: SimulatedDevice) -> bytes:
    chunks = []
    while chunk := await device.read(64 * KIB):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_a_simulated_device_reports_new_initial_data_once_and_it_loads() -> None:
    params = SimulatedParams(state_mib=1 / 16, reinit_mib=1 / 64, reinit_after=2)
    assert params.capabilities.precopy_reinit
    source = SimulatedDevice("gpu0", Side.SOURCE, params)
    destination = SimulatedDevice("gpu0", Side.DESTINATION, params)
    await source.open()
    await destination.open()
    for state in (S.RUNNING_P2P, S.STOP, S.RESUMING):
        await destination.set_state(state)
    await source.set_state(S.PRE_COPY)
    first = await source.precopy_info()
    assert first.initial_bytes > 0 and not first.reinit
    await destination.write(await drain(source))
    drained = await source.precopy_info()  # the first query to find it drained
    assert (drained.initial_bytes, drained.reinit) == (0, False)
    back = await source.precopy_info()  # the second: new initial data, 4 pages of 4 KiB
    assert (back.initial_bytes, back.reinit) == (16 * KIB, True)
    again = await source.precopy_info()
    assert (again.initial_bytes, again.reinit) == (16 * KIB, False)  # said once
    await destination.write(await drain(source))
    for _ in range(3):  # once per stream: drained for good
        info = await source.precopy_info()
        assert (info.initial_bytes, info.reinit) == (0, False)
    for state in (S.PRE_COPY_P2P, S.STOP_COPY):
        await source.set_state(state)
    await destination.write(await drain(source))
    await destination.set_state(S.STOP)  # the load checks the source's digest
    assert await destination.state_digest() == await source.state_digest()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pre_copy": False}, "reinit_mib needs pre_copy = true"),
        ({"precopy_reinit": False}, "reinit_mib needs precopy_reinit = true"),
        ({"state_mib": 0.5, "reinit_mib": 1}, "reinit_mib (1) exceeds the state (0.5 MiB)"),
        ({"reinit_after": 0}, "greater than or equal to 1"),
    ],
)
def test_a_reinit_the_device_could_never_report_is_refused_naming_the_field(
    changes: dict[str, Any], message: str
) -> None:
    field = "reinit_after" if "reinit_after" in changes else "reinit_mib"
    with pytest.raises(ValidationError) as caught:
        SimulatedParams.model_validate({"reinit_mib": 0.25, **changes})
    [problem] = problems_from_validation(caught.value, "devices[0].source")
    assert problem.path == f"devices[0].source.{field}"
    assert message in problem.message


def test_a_simulated_device_may_lack_the_feature() -> None:
    assert not SimulatedParams(precopy_reinit=False).capabilities.precopy_reinit
    # Without pre-copy there is no pre-copy information to have a second version of.
    assert not SimulatedParams(pre_copy=False).capabilities.precopy_reinit


# --- one host ---------------------------------------------------------------------------


def gpus(**gpu0: Any) -> list[dict[str, Any]]:
    """Two devices that need a few rounds under a 12 ms limit; ``gpu0``'s own parameters."""
    params: dict[str, Any] = {
        "state_mib": 1,
        "transition_ms": 2,
        "dirty_mib_s": 4,
        "drain_mib_s": 8,
    }
    return [
        sim_device("gpu0", seed=0, **{**params, **gpu0}),
        sim_device("gpu1", seed=1, **params),
    ]


def left_precopy(trace: list[TraceEvent]) -> list[TraceEvent]:
    """Source arcs that leave pre-copy for the switchover (its grace state or a stop)."""
    return [
        e
        for e in trace
        if e.kind == "arc_begin"
        and e.side is Side.SOURCE
        and (e.from_state, e.to_state) in SWITCHOVER_ARCS
    ]


def journal_left_precopy(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same, in a daemon's journal."""
    return [
        e
        for e in events
        if e["kind"] == "arc_begin"
        and e.get("side") == "source"
        and (e.get("from"), e.get("to")) in SWITCHOVER_NAMES
    ]


class Announcements:
    """What the source announced to a LocalDestination, and what was loaded at the ack."""

    def __init__(self, m: Migration) -> None:
        destination = m.destination
        assert isinstance(destination, LocalDestination)
        self.destination = destination
        self.sent: list[tuple[str, int]] = []
        self.written_at_ack: dict[str, int] | None = None
        announce = destination.initial_sent

        async def initial_sent(name: str, nbytes: int) -> None:
            self.sent.append((name, nbytes))
            await announce(name, nbytes)

        destination.initial_sent = initial_sent  # type: ignore[method-assign]
        m.observers.append(self._observe)

    def _observe(self, event: TraceEvent) -> None:
        if event.kind == "switchover_ack":
            self.written_at_ack = dict(self.destination.engine.written)


async def test_the_acknowledgement_is_asked_again_before_any_device_stops(
    autojump_clock: Any,
) -> None:
    # gpu0's destination loads at half the source's pace: the new initial data is
    # still loading when the decision is taken, and the stop waits for it.
    m = Migration(
        make_resolved(
            gpus(reinit_mib=0.25, reinit_after=2), downtime_limit_ms=12, precopy_max_rounds=30
        )
    )
    seen = Announcements(m)
    await m.run()
    await check_all(m)
    r = m.report
    assert r is not None
    assert r.outcome == "succeeded", r.error
    [back] = r.precopy.initial_returns
    assert (back.device, back.bytes, back.round, back.reacknowledge) == ("gpu0", MIB // 4, 2, True)
    assert r.precopy.converged and r.precopy.rounds > back.round
    reports = {d.name: d for d in r.devices}
    assert reports["gpu0"].precopy_reinit and reports["gpu1"].precopy_reinit
    assert reports["gpu0"].source_digest == reports["gpu0"].destination_digest
    # Announced twice: the second covers the new initial data, and the stop waited
    # for the destination to have loaded that much.
    gpu0 = [n for name, n in seen.sent if name == "gpu0"]
    assert len(gpu0) == 2 and gpu0[1] > gpu0[0] + MIB // 4
    assert [name for name, _ in seen.sent].count("gpu1") == 1
    assert seen.written_at_ack is not None and seen.written_at_ack["gpu0"] >= gpu0[1]
    # In the trace: the return, then the decision, the acknowledgement, the stops.
    trace = m.trace
    [returned] = [e for e in trace if e.kind == "initial_back"]
    assert (returned.device, dict(returned.detail)) == (
        "gpu0",
        {"bytes": MIB // 4, "round": 2, "reacknowledge": True},
    )
    [ack] = [e for e in trace if e.kind == "switchover_ack"]
    stops = left_precopy(trace)
    assert stops and returned.seq < ack.seq < min(e.seq for e in stops)
    round_two = next(e for e in trace if e.kind == "decision" and e.detail["round"] == 2)
    assert round_two.detail["action"] == "continue"  # never converged on the round it came back


async def test_the_invariant_fails_a_switchover_before_the_acknowledgement(
    autojump_clock: Any,
) -> None:
    # The check every engine test runs (check_all) holds the trace to it: the same
    # migration's trace, its acknowledgement moved after the first stop, fails.
    m = Migration(make_resolved(gpus(reinit_mib=0.25, reinit_after=2), downtime_limit_ms=12))
    await m.run()
    check_acknowledged_before_the_switchover(m)
    trace = m.trace
    [ack] = [e for e in trace if e.kind == "switchover_ack"]
    first_stop = left_precopy(trace)[0]
    trace.remove(ack)
    trace.insert(trace.index(first_stop) + 1, ack)
    with pytest.raises(AssertionError, match="before the destination acknowledged"):
        check_acknowledged_before_the_switchover(m)
    # And a return of initial data after the acknowledgement fails it too.
    trace.remove(ack)
    [back] = [e for e in trace if e.kind == "initial_back"]
    trace.insert(trace.index(back), ack)
    with pytest.raises(AssertionError, match="came back after the ack"):
        check_acknowledged_before_the_switchover(m)


async def test_a_device_without_the_feature_migrates_as_before(autojump_clock: Any) -> None:
    m = Migration(make_resolved(gpus(precopy_reinit=False), downtime_limit_ms=12))
    await m.run()
    await check_all(m)
    r = m.report
    assert r is not None
    assert r.outcome == "succeeded", r.error
    assert r.precopy.initial_returns == []
    assert [d.precopy_reinit for d in r.devices] == [False, True]
    assert not any(e.kind == "initial_back" for e in m.trace)


def never_loads_the_new_initial_data() -> dict[str, Any]:
    """gpu0's destination: its load hangs inside the new initial data (well past the
    first pre-copy round's 1 MiB state), so the new acknowledgement never comes."""
    return {"fault": {"at": "stream", "offset": MIB + 64 * KIB, "kind": "hang"}}


async def test_a_destination_that_never_acknowledges_again_rolls_back(
    autojump_clock: Any,
) -> None:
    devices = gpus(reinit_mib=0.25, reinit_after=2, destination=never_loads_the_new_initial_data())
    m = Migration(
        make_resolved(
            devices,
            downtime_limit_ms=12,
            # The decision comes with the round the initial data came back in:
            # the source sends no more than the destination's stream buffers hold.
            precopy_max_rounds=2,
            precopy_policy="switchover",
            timeouts={"switchover_s": 2, "device_call_s": 600},
        )
    )
    await m.run()
    await check_all(m)
    r = m.report
    assert r is not None and r.outcome == "rolled_back"
    assert r.error is not None and r.error.kind == "phase_timeout"
    assert "did not acknowledge the initial data within 2 s" in r.error.message
    assert [b.device for b in r.precopy.initial_returns] == ["gpu0"]
    # No device left pre-copy: every source device is back in RUNNING.
    assert left_precopy(m.trace) == []
    assert {d.source_state for d in r.devices} == {"RUNNING"}


async def test_a_local_destination_waits_for_the_announcement_after_a_return(
    autojump_clock: Any,
) -> None:
    # The decision may come before a device announces its new initial data (a
    # round cut short announces after it): the acknowledgement waits for it.
    m = Migration(make_resolved(gpus()))
    destination = m.destination
    assert isinstance(destination, LocalDestination)
    engine = destination.engine
    for name in engine.names:
        engine.written[name] = 100
        await destination.initial_sent(name, 100)
    destination.initial_back("gpu0")
    acked = trio.Event()

    async def acknowledged() -> None:
        await destination.acknowledged()
        acked.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledged)
        await trio.testing.wait_all_tasks_blocked()
        assert not acked.is_set()  # 100 bytes are loaded: not what it waits for
        await destination.initial_sent("gpu0", 100)
        await trio.testing.wait_all_tasks_blocked()
        assert acked.is_set()


async def test_an_ack_of_fewer_bytes_than_announced_does_not_count() -> None:
    secret = new_secret()
    async with serving() as (listener, address):
        dest = listener.expect("mig-r", secret, ["gpu0"])
        async with open_channel(address, "mig-r", secret, ["gpu0"]) as src:
            await dest.wait_connected()
            await src.sender("gpu0").send(b"x" * 300)
            await dest.acknowledge("gpu0", 100)  # the initial data before it came back
            assert await src.acknowledged("gpu0") == 100
            assert src.is_acknowledged("gpu0") and not src.is_acknowledged("gpu0", at_least=300)
            async with trio.open_nursery() as nursery:
                got: list[int] = []

                async def wait() -> None:
                    got.append(await src.acknowledged("gpu0", at_least=300))

                nursery.start_soon(wait)
                await dest.acknowledge("gpu0", 200)
                await dest.acknowledge("gpu0", 300)
            assert got == [300] and src.is_acknowledged("gpu0", at_least=300)


# --- two daemons ------------------------------------------------------------------------


def journal_events(host: Host, migration_id: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(host.base / "state" / "journal.sqlite3")
    try:
        rows = db.execute(
            "SELECT seq, kind, data_json FROM events WHERE migration_id = ? ORDER BY seq",
            (migration_id,),
        ).fetchall()
    finally:
        db.close()
    return [{"seq": seq, "kind": kind, **json.loads(data or "{}")} for seq, kind, data in rows]


def two_host_plan(host: Host, token_file: Path) -> dict[str, Any]:
    """Rounds that do not depend on the clock (nothing dirties): the first round
    leaves the initial data's record headers (the round sends what the device
    counted as pending); gpu1's initial data comes back in the second, as it
    drains, before it was ever announced, and gpu0's in the third, after it was
    announced in the second.  No round with a return converges; the limit is
    generous, so the fourth does."""
    plan = cross_plan(host, token_file, "gpu0", "gpu1", state_mib=0.25, dirty_mib_s=0)
    plan["downtime_limit_ms"] = 5000
    for device, after in zip(plan["devices"], (2, 1), strict=True):
        device["source"] = {**device["source"], "reinit_mib": 0.0625, "reinit_after": after}
    return plan


def recording_acks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every InitialSent the destination daemon answers, as (device, bytes)."""
    asked: list[tuple[str, int]] = []
    acknowledge = IncomingMigration._acknowledge

    async def recorded(self: IncomingMigration, message: Any) -> None:
        asked.append((message.device, message.nbytes))
        await acknowledge(self, message)

    monkeypatch.setattr(IncomingMigration, "_acknowledge", recorded)
    return asked


async def test_between_two_daemons_the_destination_acknowledges_again(
    short_dir: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = recording_acks(monkeypatch)
    async with two_daemons(short_dir, token_file) as (a, b):
        migration_id = await a.submit(two_host_plan(b, token_file))
        status = await until(lambda: a.status(migration_id), ended)
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        returns = [
            (r["device"], r["bytes"], r["round"], r["reacknowledge"])
            for r in report["precopy"]["initial_returns"]
        ]
        assert returns == [("gpu1", 64 * KIB, 2, False), ("gpu0", 64 * KIB, 3, True)]
        assert report["precopy"]["converged"] and report["precopy"]["rounds"] >= 4
        # Each destination device checked the source's digest as its load ended.
        assert (await until(lambda: b.incoming(migration_id), ended))["outcome"] == "succeeded"
        assert [d["precopy_reinit"] for d in report["devices"]] == [True, True]
        gpu0 = [n for name, n in asked if name == "gpu0"]
        assert len(gpu0) == 2 and gpu0[1] > gpu0[0]
        assert [name for name, _ in asked].count("gpu1") == 1
        events = journal_events(a, migration_id)
        returned = [e for e in events if e["kind"] == "initial_back"]
        assert [(e.get("device"), e["detail"]) for e in returned] == [
            ("gpu1", {"bytes": 64 * KIB, "round": 2, "reacknowledge": False}),
            ("gpu0", {"bytes": 64 * KIB, "round": 3, "reacknowledge": True}),
        ]
        [ack] = [e for e in events if e["kind"] == "switchover_ack"]
        stops = journal_left_precopy(events)
        assert stops and returned[-1]["seq"] < ack["seq"] < min(e["seq"] for e in stops)


async def test_between_two_daemons_no_new_acknowledgement_rolls_back(
    short_dir: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A destination that acknowledges each device's initial data once, and never
    # what came back: its first ACK must not let any device stop.
    acknowledge = IncomingMigration._acknowledge
    answered: set[str] = set()
    ignored: list[tuple[str, int]] = []

    async def once(self: IncomingMigration, message: Any) -> None:
        if message.device in answered:
            ignored.append((message.device, message.nbytes))
            return
        answered.add(message.device)
        await acknowledge(self, message)

    monkeypatch.setattr(IncomingMigration, "_acknowledge", once)
    async with two_daemons(short_dir, token_file) as (a, b):
        plan = two_host_plan(b, token_file)
        plan["timeouts"] = {"switchover_s": 1}
        migration_id = await a.submit(plan)
        status = await until(lambda: a.status(migration_id), ended)
        report = status["report"]
        assert status["outcome"] == "rolled_back", report
        assert report["error"]["kind"] == "phase_timeout"
        assert "did not acknowledge the initial data within 1 s" in report["error"]["message"]
        assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
        assert [name for name, _ in ignored] == ["gpu0"]
        far = await until(lambda: b.incoming(migration_id), ended)
        assert far["outcome"] == "rolled_back"
        assert journal_left_precopy(journal_events(a, migration_id)) == []


# --- VFIO: the probe, the opt-in and the flag --------------------------------------------


class PrecopyV2Kernel(FakeKernel):
    """A fake kernel whose driver has the pre-copy information's second version
    (``supported``); records the opt-in and sets the flag's bit when asked to."""

    def __init__(self, *, supported: bool, set_errno: int | None = None) -> None:
        super().__init__()
        self.supported = supported
        self.set_errno = set_errno
        self.opted_in = False
        self.info_flags = 0

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        if request == uapi.VFIO_MIG_GET_PRECOPY_INFO:
            assert isinstance(arg, bytearray)
            arg[4:24] = struct.pack("=IQQ", self.info_flags, 4096, 8)
            return 0
        if request == uapi.VFIO_DEVICE_FEATURE and isinstance(arg, bytearray):
            _, flags = uapi.FEATURE_HEADER.unpack_from(arg)
            if flags & uapi.FEATURE_MASK == uapi.Feature.MIG_PRECOPY_INFO_V2:
                if not self.supported:
                    raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
                assert flags & uapi.FeatureOp.SET and not flags & uapi.FeatureOp.GET
                if flags & uapi.FeatureOp.PROBE:
                    return 0
                if self.set_errno is not None:
                    raise OSError(self.set_errno, os.strerror(self.set_errno))
                assert len(arg) == uapi.FEATURE_HEADER.size  # a SET with no data
                self.opted_in = True
                return 0
        return super().ioctl(fd, request, arg)


async def vfio_device(kernel: FakeKernel) -> Any:
    from orchestrator.backends.vfio import VfioDevice

    device = VfioDevice.from_fd("dev0", Side.SOURCE, 3, identity="mdev fake", syscalls=kernel)
    return device, await device.open()


async def test_vfio_opts_in_where_the_probe_finds_the_feature_and_reads_the_flag() -> None:
    kernel = PrecopyV2Kernel(supported=True)
    device, caps = await vfio_device(kernel)
    assert kernel.opted_in and caps.precopy_reinit
    await device.set_state(S.PRE_COPY)
    info = await device.precopy_info()
    assert (info.initial_bytes, info.dirty_bytes, info.reinit) == (4096, 8, False)
    kernel.info_flags = uapi.PRECOPY_INFO_REINIT
    assert (await device.precopy_info()).reinit
    await device.close()


async def test_vfio_without_the_feature_keeps_today_s_behaviour() -> None:
    # An older kernel: the probe fails, no opt-in, and the flags field (which such
    # a kernel may hand back as the caller passed it) is never read as a flag.
    kernel = PrecopyV2Kernel(supported=False)
    device, caps = await vfio_device(kernel)
    assert not kernel.opted_in and not caps.precopy_reinit
    await device.set_state(S.PRE_COPY)
    kernel.info_flags = uapi.PRECOPY_INFO_REINIT
    assert not (await device.precopy_info()).reinit
    await device.close()
    # The plain fake kernel has no such feature either: the same capabilities.
    assert (await fake_device(FakeKernel())).capabilities == Capabilities(
        flags=kernel.flags, stop_copy_size=True
    )


async def test_vfio_a_refused_opt_in_is_not_available_and_a_broken_one_fails_the_open() -> None:
    kernel = PrecopyV2Kernel(supported=True, set_errno=errno.EOPNOTSUPP)
    device, caps = await vfio_device(kernel)
    assert not caps.precopy_reinit
    await device.close()
    broken = PrecopyV2Kernel(supported=True, set_errno=errno.EIO)
    with pytest.raises(DeviceError, match="MIG_PRECOPY_INFO_V2"):
        await vfio_device(broken)
