"""The VFIO backend against the kernel's mtty driver, inside the lab guest.

Migrations go through the public path, ``orchestrator run PLAN --json``,
with plans whose devices use ``backend = "vfio"``; what moved is proved by
reading the devices' registers through VFIO before and after.  The state
model test drives the backend's own API, one arc at a time, because the
backend is what it checks against the kernel.
"""

from __future__ import annotations

import errno
import itertools
from pathlib import Path

import pytest

from orchestrator.backends.vfio import VfioDevice, VfioParams
from orchestrator.errors import DeviceError, TransitionError
from orchestrator.states import DeviceState, MigrationFlags, Side, path, supported_states
from tests.kernel.lab import (
    DAEMON_START_S,
    MTTY_HEADER_BYTES,
    Mdevs,
    MttyHandle,
    PortSetting,
    check_port,
    expected_registers,
    mtty_stream_bytes,
    orchestrator,
    program,
    registers,
    vfio_device,
    write_plan,
)
from tests.two_daemons import Placement, ended, two_daemons, until

S = DeviceState
ALL_FLAGS = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY


def test_one_device_migrates_and_its_registers_move(mdevs: Mdevs, tmp_path: Path) -> None:
    source, destination = mdevs.create("mtty-1"), mdevs.create("mtty-1")
    setting = PortSetting(scratch=0xA5, lcr=0x1B, ier=0x05, mcr=0x0B, fifo=b"hi!")
    with MttyHandle(source) as handle:
        program(handle, 0, setting)
        assert registers(handle, 0) == expected_registers(setting)
    with MttyHandle(destination) as handle:
        # A fresh device: nothing of the source's settings is there before.
        assert registers(handle, 0) != expected_registers(setting)

    plan = write_plan(tmp_path / "one.toml", [vfio_device("tty0", source, destination)])
    result = orchestrator("run", plan, "--json")
    report = result.report()
    assert result.returncode == 0, result.stderr
    assert report["outcome"] == "succeeded", report["error"]
    assert "Traceback" not in result.stderr
    (device,) = report["devices"]
    assert device["backend"] == "vfio"
    assert (device["source_state"], device["destination_state"]) == ("STOP", "RUNNING")
    # mtty sends its header in pre-copy and the port in stop-copy.
    assert device["bytes_precopy"] == MTTY_HEADER_BYTES
    assert device["bytes_precopy"] + device["bytes_stopcopy"] == mtty_stream_bytes(1)
    assert device["source_digest"] and device["source_digest"] == device["destination_digest"]
    assert report["downtime_ms"] is not None and report["downtime_ms"] > 0

    with MttyHandle(destination) as handle:
        assert handle.state() is S.RUNNING
        check_port(handle, 0, setting)
    with MttyHandle(source) as handle:
        # Released after the commit: stopped, never running beside the destination.
        assert handle.state() is S.STOP


def test_four_devices_migrate_together_through_the_p2p_barriers(
    mdevs: Mdevs, tmp_path: Path
) -> None:
    kinds = {"uart0": "mtty-1", "uart1": "mtty-1", "dual0": "mtty-2", "dual1": "mtty-2"}
    ports = {name: 1 if kind == "mtty-1" else 2 for name, kind in kinds.items()}
    pairs = {name: (mdevs.create(kind), mdevs.create(kind)) for name, kind in kinds.items()}
    settings: dict[str, list[PortSetting]] = {}
    for index, (name, (source, _)) in enumerate(pairs.items()):
        port_settings = [
            PortSetting(
                scratch=0x10 + index,
                lcr=0x03 + index,
                ier=0x01 + index,
                mcr=0x01,
                fifo=bytes([0x61 + index]) * 2,
            ),
            # The second port of a dual device keeps DLAB set: its divisor moves too.
            PortSetting(scratch=0x80 + index, lcr=0x07, ier=0x02, mcr=0x03, divisor=0x0100 + index),
        ][: ports[name]]
        settings[name] = port_settings
        with MttyHandle(source) as handle:
            for port, setting in enumerate(port_settings):
                program(handle, port, setting)

    plan = write_plan(
        tmp_path / "four.toml",
        [vfio_device(name, source, destination) for name, (source, destination) in pairs.items()],
    )
    result = orchestrator("run", plan, "--json")
    report = result.report()
    assert result.returncode == 0, result.stderr
    assert report["outcome"] == "succeeded", report["error"]
    # Every device has P2P, so all four meet at both barriers.
    assert report["barriers"]["source_p2p"]["members"] == 4
    assert report["barriers"]["destination_p2p"]["members"] == 4
    by_name = {d["name"]: d for d in report["devices"]}
    assert set(by_name) == set(kinds)
    digests = set()
    for name, device in by_name.items():
        assert device["barrier"] == "held"
        assert device["bytes_precopy"] == MTTY_HEADER_BYTES, name
        assert device["bytes_precopy"] + device["bytes_stopcopy"] == mtty_stream_bytes(
            ports[name]
        ), name
        assert device["source_digest"] == device["destination_digest"], name
        digests.add(device["source_digest"])
    # Each device's stream carries its own state.
    assert len(digests) == 4

    for name, (source, destination) in pairs.items():
        with MttyHandle(destination) as handle:
            assert handle.state() is S.RUNNING
            for port, setting in enumerate(settings[name]):
                check_port(handle, port, setting)
        with MttyHandle(source) as handle:
            assert handle.state() is S.STOP


async def _enter(device: VfioDevice, target: DeviceState, stream: bytes) -> None:
    """One arc; a device entering RESUMING is loaded, so that it can leave it."""
    await device.set_state(target)
    assert await device.get_state() is target
    if target is S.RESUMING:
        await device.write(stream)


async def _capture_stream(device: VfioDevice) -> bytes:
    """A whole save stream, read through the pre-copy and stop-copy states."""
    await _enter(device, S.PRE_COPY, b"")
    info = await device.precopy_info()
    assert (info.initial_bytes, info.dirty_bytes) == (MTTY_HEADER_BYTES, 0)
    chunks = [await device.read(1 << 20)]
    # The temporary end of pre-copy data: "nothing more now", not an error.
    assert await device.read(1 << 20) == b""
    info = await device.precopy_info()
    assert (info.initial_bytes, info.dirty_bytes) == (0, 0)
    await _enter(device, S.PRE_COPY_P2P, b"")
    await _enter(device, S.STOP_COPY, b"")
    while chunk := await device.read(7):
        chunks.append(chunk)
    stream = b"".join(chunks)
    assert len(stream) == mtty_stream_bytes(1)
    await device.reset()
    return stream


async def test_the_state_model_agrees_with_the_kernel(mdevs: Mdevs) -> None:
    mdev = mdevs.create("mtty-1")
    device = VfioDevice("tty", Side.SOURCE, VfioParams(mdev=mdev))
    try:
        caps = await device.open()
        assert caps.flags == ALL_FLAGS
        assert caps.stop_copy_size and caps.dirty_logging
        assert device.opened_by == "group"
        assert await device.stop_copy_size() == mtty_stream_bytes(1)
        stream = await _capture_stream(device)

        states = sorted(supported_states(caps.flags))
        assert len(states) == 7
        walked = refused = 0
        for start, goal in itertools.permutations(states, 2):
            assert await device.get_state() is S.RUNNING
            for step in path(caps.flags, S.RUNNING, start):
                await _enter(device, step, stream)
            try:
                route = path(caps.flags, start, goal)
            except TransitionError:
                # The model refuses it: so must the kernel, leaving the state as it was.
                with pytest.raises(DeviceError) as refusal:
                    await device.set_state(goal)
                assert refusal.value.errno == errno.EINVAL
                assert refusal.value.operation == "VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)"
                assert refusal.value.target == goal.name
                assert await device.get_state() is start
                refused += 1
            else:
                for step in route:
                    await _enter(device, step, stream)
                walked += 1
            await device.reset()
            assert await device.get_state() is S.RUNNING
        assert (walked, refused) == (40, 2)

        # ERROR is reported, never requested: the kernel refuses it as a target.
        with pytest.raises(DeviceError) as refusal:
            await device.set_state(S.ERROR)
        assert refusal.value.errno == errno.EINVAL
        assert await device.get_state() is S.RUNNING
    finally:
        await device.close()


async def test_a_stream_the_destination_cannot_load(mdevs: Mdevs) -> None:
    source_mdev, destination_mdev = mdevs.create("mtty-1"), mdevs.create("mtty-1")
    source = VfioDevice("src", Side.SOURCE, VfioParams(mdev=source_mdev))
    destination = VfioDevice("dst", Side.DESTINATION, VfioParams(mdev=destination_mdev))
    try:
        await source.open()
        await destination.open()
        stream = await _capture_stream(source)

        async def to_resuming() -> None:
            for step in (S.RUNNING_P2P, S.STOP, S.RESUMING):
                await _enter(destination, step, b"")

        # A corrupted header (the magic's first byte flipped): the driver refuses the write.
        await to_resuming()
        corrupt = bytes([stream[0] ^ 0xFF]) + stream[1:]
        with pytest.raises(DeviceError) as bad_write:
            await destination.write(corrupt)
        assert bad_write.value.errno == errno.EFAULT
        assert bad_write.value.operation == "write(data_fd)"
        assert bad_write.value.device == "dst"
        assert destination_mdev in str(bad_write.value)
        await destination.reset()
        assert await destination.get_state() is S.RUNNING

        # A stream cut short: every write is taken, but the load fails on leaving RESUMING;
        # mtty keeps the device in RESUMING (it never falls into ERROR), and a reset recovers it.
        await to_resuming()
        await destination.write(stream[:-1])
        with pytest.raises(DeviceError) as bad_load:
            await destination.set_state(S.STOP)
        assert bad_load.value.errno == errno.EINVAL
        assert bad_load.value.target == "STOP"
        assert "RESUMING -> STOP refused; the device reads RESUMING now" in str(bad_load.value)
        assert await destination.get_state() is S.RESUMING
        await destination.reset()
        assert await destination.get_state() is S.RUNNING
        with pytest.raises(DeviceError, match="loads only in RESUMING"):
            await destination.write(stream)

        # After the reset the same device loads a whole stream.
        await to_resuming()
        await destination.write(stream)
        await _enter(destination, S.STOP, b"")
        assert await destination.state_digest() == await source.state_digest()
    finally:
        await source.close()
        await destination.close()


def test_an_mtty_1_into_an_mtty_2_is_refused_before_any_change(
    mdevs: Mdevs, tmp_path: Path
) -> None:
    # mtty checks the port count in the stream's header: a single-port device's stream
    # fed to a dual-port destination would fail to load there (EFAULT) in pre-copy.  The
    # mdev types differ, and the identity check says so before any device leaves RUNNING.
    source, destination = mdevs.create("mtty-1"), mdevs.create("mtty-2")
    setting = PortSetting(scratch=0x5A, lcr=0x2B, ier=0x03, mcr=0x09, fifo=b"xyz")
    with MttyHandle(source) as handle:
        program(handle, 0, setting)

    device = vfio_device("tty0", source, destination)
    plan = write_plan(tmp_path / "mismatch.toml", [device])
    result = orchestrator("run", plan, "--json")
    report = result.report()
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    assert report["outcome"] == "refused"
    error = report["error"]
    assert (error["kind"], error["device"]) == ("identity_mismatch", "tty0")
    assert (
        "device 'tty0': mdev_type differs: source 'mtty-1', destination 'mtty-2'"
        in (error["message"])
    )
    identities = report["compatibility"]["identities"]["tty0"]
    assert identities["source"]["model"] == "mtty-1"
    assert identities["destination"]["model"] == "mtty-2"
    # mtty's config space gives its PCI IDs; the driver is the type's parent.
    assert identities["source"]["fields"]["vendor"] == "0x4348"
    assert identities["source"]["fields"]["driver"] == "mtty"
    (reported,) = report["devices"]
    assert (reported["source_state"], reported["destination_state"]) == ("RUNNING", "RUNNING")
    assert reported["source_reset"] is False and reported["destination_reset"] is False
    assert reported["bytes_precopy"] == reported["bytes_stopcopy"] == 0
    with MttyHandle(source) as handle:
        assert handle.state() is S.RUNNING
        check_port(handle, 0, setting)
    with MttyHandle(destination) as handle:
        assert handle.state() is S.RUNNING

    # An operator who accepts the difference gets what the kernel says: the load
    # fails in pre-copy and the migration rolls back, the source's state intact.
    with MttyHandle(source) as handle:
        program(handle, 0, setting)  # its FIFO again: check_port drained it
    plan = write_plan(tmp_path / "accepted.toml", [{**device, "accept_differences": ["mdev_type"]}])
    result = orchestrator("run", plan, "--json")
    report = result.report()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert report["outcome"] == "rolled_back"
    assert report["compatibility"]["accepted"][0]["field"] == "mdev_type"
    error = report["error"]
    assert error["kind"] == "device_error"
    assert (error["side"], error["device"]) == ("destination", "tty0")
    assert error["operation"] == "write"
    assert "write(data_fd)" in error["message"] and destination in error["message"]
    assert "Bad address" in error["message"]
    (reported,) = report["devices"]
    assert reported["source_state"] == "RUNNING"
    assert reported["destination_state"] == "RUNNING"
    assert reported["destination_reset"] is True
    assert reported["source_reset"] is False
    with MttyHandle(source) as handle:
        assert handle.state() is S.RUNNING
        check_port(handle, 0, setting)
    with MttyHandle(destination) as handle:
        assert handle.state() is S.RUNNING


def test_a_busy_device_is_refused(mdevs: Mdevs, tmp_path: Path) -> None:
    source, destination = mdevs.create("mtty-1"), mdevs.create("mtty-1")
    plan = write_plan(tmp_path / "busy.toml", [vfio_device("tty0", source, destination)])
    # Another process holds the source's group, as a VMM or another migration would.
    with MttyHandle(source) as handle:
        result = orchestrator("run", plan, "--json")
        assert handle.state() is S.RUNNING
    report = result.report()
    # Refused before pre-copy began, every device as it was: exit 4.
    assert result.returncode == 4
    assert "Traceback" not in result.stderr
    assert report["outcome"] == "refused"
    error = report["error"]
    assert (error["side"], error["device"], error["operation"]) == ("source", "tty0", "open")
    assert "Device or resource busy" in error["message"]
    assert "in use by another process" in error["message"]
    # The report says where each device stands: the destination's as it answered.
    assert report["devices"][0]["source_state"] == "unknown"
    assert report["devices"][0]["destination_state"] == "RUNNING"
    # Nothing moved: both devices are where they were, and a later run succeeds.
    with MttyHandle(destination) as handle:
        assert handle.state() is S.RUNNING
    again = orchestrator("run", plan, "--json")
    assert again.returncode == 0, again.stderr
    assert again.report()["outcome"] == "succeeded"


async def test_one_process_opens_a_device_once(mdevs: Mdevs) -> None:
    mdev = mdevs.create("mtty-1")
    first = VfioDevice("a", Side.SOURCE, VfioParams(mdev=mdev))
    second = VfioDevice("b", Side.SOURCE, VfioParams(mdev=mdev))
    try:
        await first.open()
        with pytest.raises(DeviceError, match="already open in this process") as busy:
            await second.open()
        assert busy.value.errno == errno.EBUSY
    finally:
        await second.close()
        await first.close()
    # Closed, the device (and its group) can be opened again.
    third = VfioDevice("c", Side.SOURCE, VfioParams(mdev=mdev))
    try:
        await third.open()
    finally:
        await third.close()
    with MttyHandle(mdev) as handle:
        assert handle.state() is S.RUNNING


def test_a_plan_naming_a_missing_device_is_refused(mdevs: Mdevs, tmp_path: Path) -> None:
    present, other = mdevs.create("mtty-1"), mdevs.create("mtty-1")
    missing = "3b2c7a1e-0000-4000-8000-000000000000"
    plan = write_plan(
        tmp_path / "bad.toml",
        [vfio_device("tty0", present, missing), vfio_device("tty1", other, other)],
    )
    result = orchestrator("run", plan, "--json")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert f"devices[0].destination.mdev: no mediated device {missing}" in result.stderr
    assert "devices[1].destination.mdev: the destination is the source device itself" in (
        result.stderr
    )
    # Refused before anything was opened: both devices are free and RUNNING.
    for mdev in (present, other):
        with MttyHandle(mdev) as handle:
            assert handle.state() is S.RUNNING


async def test_two_daemons_move_mtty_devices_through_the_channels_threads(
    mdevs: Mdevs, short_dir: Path, token_file: Path
) -> None:
    # Between two daemons, a VFIO device's data_fd is read by the data channel's
    # writer thread and written by the destination's reader thread (the blocking
    # side of the backend's stream): the registers must arrive all the same.
    pairs = [(mdevs.create("mtty-1"), mdevs.create("mtty-1")) for _ in range(2)]
    settings = [
        PortSetting(scratch=0x3C + i, lcr=0x1B, ier=0x05, mcr=0x0B, fifo=f"dm{i}".encode())
        for i in range(2)
    ]
    for (source, _), setting in zip(pairs, settings, strict=True):
        with MttyHandle(source) as handle:
            program(handle, 0, setting)
    slow = Placement(ready_s=DAEMON_START_S)
    async with two_daemons(short_dir, token_file, processes=True, placements=(slow, slow)) as (
        a,
        b,
    ):
        plan = {
            "vm": "lab-two-daemons",
            "downtime_limit_ms": 10000,
            "destination": {"url": b.api_url, "token_file": str(token_file)},
            "devices": [
                vfio_device(f"tty{i}", source, destination)
                for i, (source, destination) in enumerate(pairs)
            ],
        }
        migration_id = await a.submit(plan)
        status = await until(lambda: a.status(migration_id), ended, seconds=240)
        report = status["report"]
        assert status["outcome"] == "succeeded", report["error"]
        for device in report["devices"]:
            assert device["bytes_precopy"] + device["bytes_stopcopy"] == mtty_stream_bytes(1)
            assert (device["source_state"], device["destination_state"]) == ("STOP", "RUNNING")
    for (source, destination), setting in zip(pairs, settings, strict=True):
        with MttyHandle(destination) as handle:
            assert handle.state() is S.RUNNING
            check_port(handle, 0, setting)
        with MttyHandle(source) as handle:
            assert handle.state() is S.STOP
