"""The vhost_vdpa backend against the kernel's vdpa_sim_net, inside the lab guest.

This test process plays the VMM (``tests/kernel/vdpa_vmm.py``): it owns the
source and the destination ``/dev/vhost-vdpa-N``, maps one guest memory
into both, places the RX and TX rings there and serves each device's owner
channel.  It starts ``orchestrator run --json PLAN`` as its child with both
descriptors passed on, and the plan names them by number (``fd = N``), as a
VMM that runs the orchestrator beside it would.  What moved is proved on
the rings: which frames came back on RX, how often, and which device's call
eventfd fired for them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from orchestrator.backends import vhost_vdpa_uapi as uapi
from tests.kernel.lab import (
    Mdevs,
    MttyHandle,
    PortSetting,
    RunResult,
    check_port,
    program,
    vfio_device,
    write_plan,
)
from tests.kernel.vdpa_vmm import (
    RX,
    TX,
    GuestMemory,
    OwnerServer,
    SplitRing,
    VdpaDevices,
    VmmDevice,
    frame,
    frame_tag,
)

RX_BUFFERS = 32


def run_with_fds(plan: Path, fds: list[int], *args: str, timeout: float = 180) -> RunResult:
    """``orchestrator run PLAN`` as the VMM's child, with ``fds`` passed on."""
    exe = shutil.which("orchestrator")
    command = [exe] if exe else [sys.executable, "-m", "orchestrator"]
    proc = subprocess.run(
        [*command, "run", str(plan), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        pass_fds=fds,
    )
    return RunResult(proc.returncode, proc.stdout, proc.stderr)


def negotiated(name: str) -> list[str]:
    """The features the kernel says the driver of vDPA device ``name`` negotiated."""
    out = subprocess.run(
        ["vdpa", "-j", "dev", "config", "show", name], capture_output=True, text=True, check=True
    )
    config = json.loads(out.stdout)["config"][name]
    return sorted(config.get("negotiated_features", []))


class Guest:
    """One VM's NIC as this VMM stand-in sees it: memory, rings, two devices."""

    def __init__(self, source: Path, destination: Path, sockets: Path) -> None:
        self.memory = GuestMemory()
        self.rx = SplitRing(self.memory, RX, self.memory.iova, self.memory.iova + 0x10000)
        self.tx = SplitRing(self.memory, TX, self.memory.iova + 0x4000, self.memory.iova + 0x30000)
        self.source = VmmDevice(source)
        self.destination = VmmDevice(destination)
        self.source.set_up(self.memory, [self.rx, self.tx])
        # The destination VMM maps memory and rings but leaves features and
        # DRIVER_OK to the migration, which brings the source's.
        self.destination.set_up(self.memory, [self.rx, self.tx], features=None)
        self.source.start()
        self.owners = {
            "source": OwnerServer(self.source, sockets / "source-owner.sock"),
            "destination": OwnerServer(self.destination, sockets / "destination-owner.sock"),
        }
        self.delivered: list[str] = []

    def device(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "backend": "vhost_vdpa",
            "source": {"fd": self.source.fd, "owner_socket": str(self.owners["source"].path)},
            "destination": {
                "fd": self.destination.fd,
                "owner_socket": str(self.owners["destination"].path),
            },
        }

    def post_rx(self, device: VmmDevice, count: int) -> None:
        for _ in range(count):
            self.rx.add(None, writable=True)
        device.notify(RX)

    def send(self, device: VmmDevice | None, tag: str) -> None:
        """Queue one frame on TX and kick ``device`` (None: queue only, no kick)."""
        self.tx.add(frame(tag), writable=False)
        if device is not None:
            device.notify(TX)

    def collect(self, expected: int, timeout: float = 10.0) -> list[str]:
        """Frames that came back on RX until ``expected`` in all, or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.delivered += [frame_tag(d.data) for d in self.rx.take_used()]
            self.tx.take_used()
            if len(self.delivered) >= expected or time.monotonic() > deadline:
                return self.delivered
            time.sleep(0.02)

    def bases(self, device: VmmDevice) -> tuple[int, int]:
        return device.vring_base(RX), device.vring_base(TX)

    def close(self) -> None:
        for owner in self.owners.values():
            owner.close()
        self.source.close()
        self.destination.close()


def test_a_vdpa_nic_migrates_with_its_ring_positions_and_no_frame_twice(
    vdpa_devices: VdpaDevices, tmp_path: Path
) -> None:
    guest = Guest(vdpa_devices.sim_net("vdpa-src"), vdpa_devices.sim_net("vdpa-dst"), tmp_path)
    try:
        source, destination = guest.source, guest.destination
        guest.post_rx(source, RX_BUFFERS)
        guest.send(source, "before")
        assert guest.collect(1) == ["before"]
        assert (source.calls(RX), source.calls(TX)) == (1, 1)
        assert (destination.calls(RX), destination.calls(TX)) == (0, 0)
        # A frame the guest queued but the source had not processed when it stopped.
        guest.send(None, "queued")
        at_suspend = guest.bases(source)
        assert at_suspend == (1, 1)

        plan = write_plan(tmp_path / "vdpa.toml", [guest.device("nic0")], vm="vm-vdpa")
        result = run_with_fds(plan, [source.fd, destination.fd], "--json")
        report = result.report()
        assert result.returncode == 0, result.stderr
        assert report["outcome"] == "succeeded", report["error"]
        (device,) = report["devices"]
        assert device["backend"] == "vhost_vdpa"
        assert (device["source_state"], device["destination_state"]) == ("STOP", "RUNNING")
        assert device["bytes_precopy"] == 0 and device["bytes_stopcopy"] > 0
        assert device["source_digest"] and device["source_digest"] == device["destination_digest"]
        timings = device["backend_timings_ms"]
        for step in ("source_suspend", "source_state_read", "destination_restore"):
            assert step in timings, timings
        assert "destination_start" in timings and "destination_resume" in timings
        print(f"vdpa timings ms: {timings}; downtime {report['downtime_ms']} ms")
        assert guest.owners["source"].requests == ["vrings"]
        assert guest.owners["destination"].requests == ["set_bases", "enable"]

        # The destination runs from the source's ring positions; the source stays stopped.
        # vdpa_sim may already have taken the queued frame as it resumed (a kick that
        # reached it while suspended is processed then), so its rings stand at the
        # source's or one frame further; where they started, and that no frame went
        # twice, the counts below prove.
        assert destination.status() == source.status() == 0x0F
        assert guest.bases(destination) in (at_suspend, (at_suspend[0] + 1, at_suspend[1] + 1))
        # It never negotiated: the record brought the source's features (the kernel's
        # own account, through the vdpa tool's netlink, not the VMM's).
        assert negotiated("vdpa-dst") == negotiated("vdpa-src") != []
        # The destination VMM kicks every ring once as it resumes the vCPUs.
        destination.notify(RX)
        destination.notify(TX)
        assert guest.collect(2) == ["before", "queued"]
        for n in range(3):
            guest.send(destination, f"after-{n}")
        delivered = guest.collect(5)
        time.sleep(0.3)
        # A kick reaching the stopped source must not make it process anything.
        source.notify(TX)
        source.notify(RX)
        time.sleep(0.3)
        delivered = guest.collect(5, timeout=0.1)
        assert Counter(delivered) == Counter(["before", "queued", "after-0", "after-1", "after-2"])
        assert source.calls(RX) == 0 and source.calls(TX) == 0
        assert destination.calls(RX) >= 1 and destination.calls(TX) >= 1
        assert guest.bases(destination) == (at_suspend[0] + 4, at_suspend[1] + 4)
        assert guest.bases(source) == at_suspend
    finally:
        guest.close()


def test_two_mtty_and_a_vdpa_nic_migrate_through_the_barriers(
    vdpa_devices: VdpaDevices, mdevs: Mdevs, tmp_path: Path
) -> None:
    guest = Guest(vdpa_devices.sim_net("mix-src"), vdpa_devices.sim_net("mix-dst"), tmp_path)
    try:
        guest.post_rx(guest.source, RX_BUFFERS)
        guest.send(guest.source, "before")
        assert guest.collect(1) == ["before"]
        ttys = {name: (mdevs.create("mtty-1"), mdevs.create("mtty-1")) for name in ("tty0", "tty1")}
        settings = {}
        for n, (name, (src, _)) in enumerate(ttys.items()):
            settings[name] = PortSetting(scratch=0x30 + n, lcr=0x03, ier=0x01, mcr=0x08, fifo=b"x")
            with MttyHandle(src) as handle:
                program(handle, 0, settings[name])
        devices = [vfio_device(name, src, dst) for name, (src, dst) in ttys.items()]
        devices.append(guest.device("nic0"))
        plan = write_plan(tmp_path / "mixed.toml", devices, vm="vm-mixed")
        result = run_with_fds(plan, [guest.source.fd, guest.destination.fd], "--json")
        report = result.report()
        assert result.returncode == 0, result.stderr
        assert report["outcome"] == "succeeded", report["error"]
        assert {d["name"]: d["barrier"] for d in report["devices"]} == {
            "tty0": "held",
            "tty1": "held",
            "nic0": "held",
        }
        for barrier in ("source_p2p", "destination_p2p"):
            assert report["barriers"][barrier]["members"] == 3, report["barriers"]
        for name, (_, dst) in ttys.items():
            with MttyHandle(dst) as handle:
                check_port(handle, 0, settings[name])
        guest.destination.notify(TX)
        guest.send(guest.destination, "after")
        assert Counter(guest.collect(2)) == Counter(["before", "after"])
        assert guest.source.calls(RX) == 1  # only "before", before the migration
    finally:
        guest.close()


def test_a_device_that_cannot_be_suspended_is_refused_up_front(
    vdpa_devices: VdpaDevices, tmp_path: Path
) -> None:
    # VDUSE makes real vhost-vdpa devices, without suspend.
    unsuspendable = VmmDevice(vdpa_devices.vduse_net("vduse-src"))
    destination = VmmDevice(vdpa_devices.sim_net("sim-dst"))
    try:
        offered = unsuspendable.ioctl_u64(uapi.VHOST_GET_BACKEND_FEATURES)
        assert not offered & uapi.bit(uapi.BACKEND_F_SUSPEND), hex(offered)
        status = unsuspendable.status()
        device = {
            "name": "nic0",
            "backend": "vhost_vdpa",
            "source": {"fd": unsuspendable.fd, "owner_socket": str(tmp_path / "s.sock")},
            "destination": {"fd": destination.fd, "owner_socket": str(tmp_path / "d.sock")},
        }
        plan = write_plan(tmp_path / "refused.toml", [device])
        result = run_with_fds(plan, [unsuspendable.fd, destination.fd])
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert "devices[0].source.fd" in result.stderr, result.stderr
        assert "lack SUSPEND" in result.stderr and "migrated live" in result.stderr
        assert "Traceback" not in result.stderr
        assert unsuspendable.status() == status  # nothing touched
    finally:
        unsuspendable.close()
        destination.close()
