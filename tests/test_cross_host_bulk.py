"""Between two daemons, device state moves in the data channel's own threads.

The source's connection writer reads each device through the blocking side
of its stream, the destination's connection reader loads it; trio's
``read`` and ``write`` are not called for a device that offers that side.
A device call that hangs there still fails the migration at its deadline.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from orchestrator.backends.base import StreamChunk
from orchestrator.backends.simulated.device import SimulatedDevice, _ThreadSide
from tests.test_cross_host import incoming, submit
from tests.two_daemons import cross_plan, ended, two_daemons, until

MIB = 1 << 20


@pytest.fixture
def no_trio_path(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of a simulated device's trio-side ``read`` or ``write``, by name."""
    calls: list[str] = []
    read, write = SimulatedDevice.read, SimulatedDevice.write

    async def counted_read(self: SimulatedDevice, max_bytes: int) -> bytes:
        calls.append(f"read {self.name}")
        return await read(self, max_bytes)

    async def counted_write(self: SimulatedDevice, data: StreamChunk) -> None:
        calls.append(f"write {self.name}")
        await write(self, data)

    monkeypatch.setattr(SimulatedDevice, "read", counted_read)
    monkeypatch.setattr(SimulatedDevice, "write", counted_write)
    return calls


async def test_device_state_crosses_in_the_channels_threads_byte_exact(
    short_dir: Path, token_file: Path, no_trio_path: list[str]
) -> None:
    async with two_daemons(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", "gpu1", "nic0", state_mib=3)
        status = await submit(a, plan)
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        far = await incoming(b, status["id"])
        for device in report["devices"]:
            assert device["bytes_precopy"] + device["bytes_stopcopy"] >= 3 << 20
            assert far["devices"][device["name"]]["digest"] == device["source_digest"]
    assert no_trio_path == []


async def test_a_device_with_a_fault_configured_moves_through_trio_and_still_arrives(
    short_dir: Path, token_file: Path, no_trio_path: list[str]
) -> None:
    # A fault's hang and delays are trio sleeps: such a device is read through trio.
    async with two_daemons(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", "nic0")
        fault = {"at": "STOP_COPY", "kind": "delay", "delay_ms": 1}
        plan["devices"][0]["source"] = {**plan["devices"][0]["source"], "fault": fault}
        status = await submit(a, plan)
        assert status["outcome"] == "succeeded", status["report"]
    assert {call.split()[1] for call in no_trio_path} == {"gpu0"}


@pytest.mark.parametrize(("call", "side"), [("read_into", "source"), ("write_from", "destination")])
async def test_a_device_call_that_hangs_in_a_channel_thread_fails_at_its_deadline(
    short_dir: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch, call: str, side: str
) -> None:
    # gpu1's read (source) or load (destination) never answers: the runner gives up
    # on it at the device call deadline (its cancel set, which ends the call here)
    # and both hosts roll back, the failure naming the device, side and operation.
    real = getattr(_ThreadSide, call)

    def hanging(self: _ThreadSide, data: memoryview, cancel: threading.Event) -> Any:
        if self._device.name == "gpu1":
            cancel.wait()
        return real(self, data, cancel)

    monkeypatch.setattr(_ThreadSide, call, hanging)
    async with two_daemons(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", "gpu1")
        plan["timeouts"] = {"device_call_s": 1}
        status = await submit(a, plan)
        report = status["report"]
        assert status["outcome"] == "rolled_back", report
        error = report["error"]
        operation = "read" if side == "source" else "write"
        assert (error["side"], error["kind"], error["device"], error["operation"]) == (
            side,
            "device_timeout",
            "gpu1",
            operation,
        )
        assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
        far = await incoming(b, status["id"])
        assert far["outcome"] == "rolled_back"
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def test_a_slow_destination_device_keeps_the_daemons_memory_under_its_cap(
    short_dir: Path, token_file: Path
) -> None:
    # 256 MiB of state into a destination device that loads at 128 MiB/s and keeps
    # nothing: whatever the destination daemon holds meanwhile is its own.  Bounded,
    # it grows by its buffers ([data] max_buffered_mib, 32 by default) and a constant,
    # not by the state.
    state_mib, cap_mib, constant_mib = 256, 32, 40
    async with two_daemons(short_dir, token_file, processes=True) as (a, b):
        assert b.process is not None
        plan = cross_plan(b, token_file, "gpu0", state_mib=state_mib, dirty_mib_s=0)
        plan["devices"][0]["destination"] = {"discard": True, "drain_mib_s": 128}
        plan["downtime_limit_ms"] = 60_000
        plan["timeouts"] = {"device_call_s": 30}
        before = _rss_bytes(b.process.pid)
        peak = before
        migration_id = await a.submit(plan)

        async def sampled() -> dict[str, Any]:
            nonlocal peak
            assert b.process is not None
            peak = max(peak, _rss_bytes(b.process.pid))
            return await a.status(migration_id)

        status = await until(sampled, ended, seconds=120)
        assert status["outcome"] == "succeeded", status["report"]
        far = await incoming(b, migration_id)
        assert far["devices"]["gpu0"]["digest"] is None  # it kept nothing to digest
    growth_mib = (peak - before) / MIB
    assert growth_mib < cap_mib + constant_mib, f"the destination grew by {growth_mib:.0f} MiB"
