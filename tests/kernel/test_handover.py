"""Devices by handle: a VMM lends the daemon its real VFIO devices, which migrate.

One ``orchestrator serve`` for the module (a process start costs ~14 s under
TCG).  The test is the VMM: it opens each mtty device through its group and
container as QEMU does (:class:`MttyHandle`), keeps them open throughout, and
hands the daemon the *device* descriptors over the handover socket.  The
daemon works on duplicates of them; what moved is read back through the
VMM's own descriptors.  A ``[vmm]`` command stand-in holds the migration at
the source's pause for as long as the test needs it in flight.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.handover import HandoverClient, HandoverError
from orchestrator.states import DeviceState
from tests.kernel.lab import (
    MTTY_HEADER_BYTES,
    Daemon,
    Lab,
    Mdevs,
    MttyHandle,
    PortSetting,
    check_port,
    device_state,
    expected_registers,
    iommu_group,
    mtty_stream_bytes,
    program,
    registers,
    vmm_stand_in,
    wait_for,
)

S = DeviceState
VM = "lab-vm"


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[Daemon]:
    served = Daemon(Path(tempfile.mkdtemp(prefix="orch-", dir="/tmp")))
    served.start()
    try:
        yield served
    finally:
        status = served.stop()
        logs = served.logs()
        assert status == 0, f"the daemon exited {status}:\n{logs}"
        assert "Traceback" not in logs, logs


def handle_plan(
    vm: str, name: str, source: str, destination: str, vmm: dict[str, Any] | None = None
) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "vm": vm,
        "downtime_limit_ms": 10000,
        "devices": [
            {
                "name": name,
                "backend": "vfio",
                "source": {"handle": source},
                "destination": {"handle": destination},
            }
        ],
    }
    if vmm is not None:
        plan["vmm"] = vmm
        plan["timeouts"] = {"vmm_call_s": 120}
    return plan


def test_a_vmm_hands_its_devices_over_and_they_migrate_by_handle(
    daemon: Daemon, mdevs: Mdevs
) -> None:
    source, destination = mdevs.create("mtty-1"), mdevs.create("mtty-1")
    setting = PortSetting(scratch=0xC3, lcr=0x1B, ier=0x05, mcr=0x0B, fifo=b"vm!")
    vmm = daemon.root / "vmm-migrate"
    plan = handle_plan(
        VM,
        "tty0",
        f"{VM}/src",
        f"{VM}/dst",
        vmm={
            "source": {"command": vmm_stand_in(vmm / "source", running=True)},
            "destination": {"command": vmm_stand_in(vmm / "destination", running=False)},
        },
    )
    with (
        MttyHandle(source) as src,
        MttyHandle(destination) as dst,
        HandoverClient(daemon.handover_socket, timeout_s=60) as client,
        daemon.api() as api,
    ):
        program(src, 0, setting)
        assert registers(dst, 0) != expected_registers(setting)
        client.register(VM)
        assert client.hand_over(VM, "src", "vfio", src.fd) == f"{VM}/src"
        assert client.hand_over(VM, "dst", "vfio", dst.fd) == f"{VM}/dst"

        response = api.post("/v1/migrations", json=plan)
        assert response.status_code == 201, response.text
        migration = response.json()["id"]
        # Held at the source's pause: pre-copy is done, the devices are the daemon's.
        wait_for(vmm / "source" / "pausing")
        with pytest.raises(HandoverError) as in_use:
            client.take_back(f"{VM}/src")
        assert in_use.value.code == "in_use" and migration in in_use.value.message
        # The same real devices under another name: locked by their handles.
        again = api.post("/v1/migrations", json=handle_plan(VM, "serial", f"{VM}/src", f"{VM}/dst"))
        assert again.status_code == 409, again.text
        assert f"vfio:handle:{VM}/src (migration {migration})" in again.text
        devices = {d["device"]: d for d in api.get("/v1/devices").json()}
        assert devices[f"vfio:handle:{VM}/dst"]["migration"] == migration
        assert devices[f"vfio:handle:{VM}/dst"]["name"] == "tty0"
        (vmm / "source" / "go").touch()
        status = daemon.wait_outcome(api, migration)

        report = status["report"]
        assert status["outcome"] == "succeeded", report["error"]
        (device,) = report["devices"]
        assert (device["source_state"], device["destination_state"]) == ("STOP", "RUNNING")
        assert device["bytes_precopy"] == MTTY_HEADER_BYTES
        assert device["bytes_precopy"] + device["bytes_stopcopy"] == mtty_stream_bytes(1)
        assert device["source_digest"] and device["source_digest"] == device["destination_digest"]
        # Through the VMM's own descriptors: the state moved, the source stopped.
        assert dst.state() is S.RUNNING
        check_port(dst, 0, setting)
        assert src.state() is S.STOP
        assert not (vmm / "destination" / "paused").exists()  # resumed there

        # Free again: the VMM takes its devices back (the daemon's copies of them).
        for name, expected in (("src", S.STOP), ("dst", S.RUNNING)):
            fd = client.take_back(f"{VM}/{name}")
            try:
                assert device_state(fd) is expected
            finally:
                os.close(fd)
        assert client.list()["handles"] == []


def test_the_handover_socket_takes_only_vfio_devices(daemon: Daemon, mdevs: Mdevs) -> None:
    mdev = mdevs.create("mtty-1")
    vm = "lab-refusals"
    with (
        MttyHandle(mdev) as handle,
        open(os.devnull, "r+b", buffering=0) as null,
        HandoverClient(daemon.handover_socket, timeout_s=60) as client,
    ):
        client.register(vm)
        cases = [
            (handle.group, "vfio", f"the VFIO group /dev/vfio/{iommu_group(mdev)}, not a device"),
            (handle.container, "vfio", "the character device /dev/vfio/vfio"),
            (null.fileno(), "vfio", "the character device /dev/null"),
            (handle.fd, "vhost_vdpa", "not a vhost-vdpa device"),
        ]
        for fd, kind, message in cases:
            with pytest.raises(HandoverError) as refused:
                client.hand_over(vm, "tty0", kind, fd)
            assert refused.value.code == "wrong_kind", refused.value
            assert message in refused.value.message, refused.value.message
        assert client.list()["handles"] == []
        # Refusals change nothing: the VMM's device is where it was.
        assert handle.state() is S.RUNNING

        # A plan naming handles the daemon does not hold: a plan error, field by field.
        with daemon.api() as api:
            response = api.post(
                "/v1/migrations", json=handle_plan(vm, "tty0", f"{vm}/tty0", f"{vm}/tty1")
            )
        assert response.status_code == 422, response.text
        problems = {p["path"]: p["message"] for p in response.json()["error"]["problems"]}
        for side, name in (("source", "tty0"), ("destination", "tty1")):
            assert (
                f"no device is handed over as '{vm}/{name}'"
                in problems[f"devices[0].{side}.handle"]
            )
