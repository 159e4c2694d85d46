"""Between two daemons, device state moves in the data channel's own threads.

The source's connection writer reads each device through the blocking side
of its stream, the destination's connection reader loads it; trio's
``read`` and ``write`` are not called for a device that offers that side.
A device call that hangs there still fails the migration at its deadline.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from orchestrator.backends.base import StreamChunk
from orchestrator.backends.simulated.device import SimulatedDevice, _ThreadSide
from tests.test_cross_host import incoming, submit
from tests.two_daemons import cross_plan, two_daemons


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


async def test_a_device_read_that_hangs_in_a_channel_thread_fails_at_its_deadline(
    short_dir: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    read_into = _ThreadSide.read_into

    def hanging(self: _ThreadSide, buffer: memoryview) -> int:
        if self._device.name == "gpu1":
            release.wait()
        return read_into(self, buffer)

    monkeypatch.setattr(_ThreadSide, "read_into", hanging)
    try:
        async with two_daemons(short_dir, token_file) as (a, b):
            plan = cross_plan(b, token_file, "gpu0", "gpu1")
            plan["timeouts"] = {"device_call_s": 1}
            status = await submit(a, plan)
            report = status["report"]
            assert status["outcome"] == "rolled_back", report
            error = report["error"]
            assert (error["kind"], error["device"], error["operation"]) == (
                "device_timeout",
                "gpu1",
                "read",
            )
            assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
            far = await incoming(b, status["id"])
            assert far["outcome"] == "rolled_back"
    finally:
        release.set()
