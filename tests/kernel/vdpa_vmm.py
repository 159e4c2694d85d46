"""A VMM stand-in for vhost-vdpa devices: guest memory, rings, frames, the owner channel.

A real VMM (QEMU, cloud-hypervisor) owns a VM's vhost-vdpa devices: it calls
``VHOST_SET_OWNER``, maps guest memory into the device's IOTLB (vhost-vdpa
pins or binds the pages of the process that maps them), places the
virtqueues in guest memory and starts the device.  The kernel then serves
everything about virtqueues and the IOTLB to that process only
(``vhost_dev_check_owner``), so the orchestrator, another process, reaches
the ring positions through the VMM: the *owner channel* of
``orchestrator.backends.vhost_vdpa``.

This module plays that VMM for the kernel-lab tests, with the real
``vdpa_sim_net`` driver behind it:

* :class:`GuestMemory`: one shared anonymous mapping standing in for guest RAM;
* :class:`SplitRing`: the driver's side of a split virtqueue in that memory;
* :class:`VmmDevice`: one ``/dev/vhost-vdpa-N`` set up as a VMM sets it up
  (owner, backend features, IOTLB map, ring sizes and addresses, kick and
  call eventfds), able to start it as the guest's driver would;
* :class:`OwnerServer`: the owner channel of one device, served from a
  thread of this process (the owner), on a Unix socket path that the plan
  names as ``owner_socket``.

Source and destination devices map the *same* guest memory at the same
IOVAs and so share the rings: one process stands in for the source VMM and
the destination VMM, whose guest memory a live migration has copied.  Which
device processed a descriptor is told by its call eventfd (each device
signals only its own) and by its ring position.

vdpa_sim_net loops every frame sent on its TX queue (1) back to its RX
queue (0); with no RX buffer posted the frame is dropped, so tests post
enough of them.  A frame on either ring is a 12-byte ``virtio_net_hdr_v1``
then the Ethernet frame.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.backends import vhost_vdpa_uapi as uapi

RX, TX = 0, 1
RING_SIZE = 256
NET_HDR_BYTES = 12  # struct virtio_net_hdr_v1
BUFFER_BYTES = 2048
DESC_F_WRITE = 2
#: The virtio-net features the stand-in's driver accepts: VERSION_1 and
#: ACCESS_PLATFORM (which vdpa_sim requires), MAC, MTU and STATUS.  Without
#: CTRL_VQ the control queue (2) stays unused, as a simple guest leaves it.
NET_FEATURES = (
    uapi.bit(uapi.VIRTIO_F_VERSION_1)
    | uapi.bit(uapi.VIRTIO_F_ACCESS_PLATFORM)
    | uapi.bit(5)  # VIRTIO_NET_F_MAC
    | uapi.bit(3)  # VIRTIO_NET_F_MTU
    | uapi.bit(16)  # VIRTIO_NET_F_STATUS
)
#: Backend features a VMM acks when the device offers them.
WANTED_BACKEND = (
    uapi.BACKEND_F_IOTLB_MSG_V2,
    uapi.BACKEND_F_IOTLB_BATCH,
    uapi.BACKEND_F_SUSPEND,
    uapi.BACKEND_F_RESUME,
    uapi.BACKEND_F_ENABLE_AFTER_DRIVER_OK,
    uapi.BACKEND_F_IOTLB_PERSIST,
)
BROADCAST = b"\xff" * 6


class GuestMemory:
    """Guest RAM: a shared anonymous mapping at guest address (IOVA) ``iova``."""

    def __init__(self, size: int = 1 << 20, iova: int = 0x100000) -> None:
        self.size = size
        self.iova = iova
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        #: The mapping's address in this process: what the IOTLB maps the IOVAs to.
        self.uaddr = ctypes.addressof(self._anchor)

    def write(self, iova: int, data: bytes) -> None:
        offset = iova - self.iova
        self.map[offset : offset + len(data)] = data

    def read(self, iova: int, size: int) -> bytes:
        offset = iova - self.iova
        return bytes(self.map[offset : offset + size])

    def u16(self, iova: int) -> int:
        return int(struct.unpack("<H", self.read(iova, 2))[0])


@dataclass(frozen=True)
class Delivered:
    """A buffer the device returned on a ring's used side."""

    position: int
    descriptor: int
    length: int
    data: bytes


class SplitRing:
    """The driver's side of one split virtqueue, laid out in guest memory."""

    def __init__(self, memory: GuestMemory, index: int, base: int, buffers: int) -> None:
        self.memory = memory
        self.index = index
        self.size = RING_SIZE
        self.desc = base
        self.avail = base + 0x1000
        self.used = base + 0x2000
        self.buffers = buffers  # the IOVA of this ring's buffer area
        self.next_avail = 0
        self.seen_used = 0
        self.pending: dict[int, int] = {}

    def add(self, payload: bytes | None, *, writable: bool) -> int:
        """Make one buffer available (not kicked); returns its descriptor index."""
        descriptor = self.next_avail % self.size
        address = self.buffers + descriptor * BUFFER_BYTES
        length = BUFFER_BYTES
        if payload is not None:
            assert len(payload) <= BUFFER_BYTES
            self.memory.write(address, payload)
            length = len(payload)
        flags = DESC_F_WRITE if writable else 0
        self.memory.write(
            self.desc + 16 * descriptor, struct.pack("<QIHH", address, length, flags, 0)
        )
        self.memory.write(
            self.avail + 4 + 2 * (self.next_avail % self.size), struct.pack("<H", descriptor)
        )
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        # The avail index last: the device reads the entry only once it moved.
        self.memory.write(self.avail + 2, struct.pack("<H", self.next_avail))
        self.pending[descriptor] = address
        return descriptor

    def used_index(self) -> int:
        return self.memory.u16(self.used + 2)

    def take_used(self) -> list[Delivered]:
        """The buffers the device used since the last call, in order."""
        out = []
        end = self.used_index()
        while self.seen_used != end:
            slot = self.used + 4 + 8 * (self.seen_used % self.size)
            descriptor, length = struct.unpack("<II", self.memory.read(slot, 8))
            address = self.pending.pop(descriptor)
            out.append(
                Delivered(self.seen_used, descriptor, length, self.memory.read(address, length))
            )
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out


def frame(tag: str, mac: bytes = BROADCAST) -> bytes:
    """A TX buffer: a zero virtio-net header, then an Ethernet frame carrying ``tag``."""
    body = mac + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + tag.encode()
    return bytes(NET_HDR_BYTES) + body


def frame_tag(data: bytes) -> str:
    return data[NET_HDR_BYTES + 14 :].decode()


class VmmDevice:
    """One ``/dev/vhost-vdpa-N``, owned and set up by this process as a VMM does."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self.enabled: dict[int, bool] = {}
        self.sizes: dict[int, int] = {}
        self.features = 0
        self.backend_features = 0

    # -- raw ioctls (the owner's) --

    def ioctl_u64(self, request: int, value: int | None = None) -> int:
        buf = bytearray(uapi.U64.pack(value or 0))
        fcntl.ioctl(self.fd, request, buf, True)
        return int(uapi.U64.unpack(buf)[0])

    def status(self) -> int:
        buf = bytearray(1)
        fcntl.ioctl(self.fd, uapi.VHOST_VDPA_GET_STATUS, buf, True)
        return buf[0]

    def set_status(self, status: int) -> None:
        fcntl.ioctl(self.fd, uapi.VHOST_VDPA_SET_STATUS, bytearray([status]), True)

    def vring_base(self, index: int) -> int:
        buf = uapi.vring_state(index)
        fcntl.ioctl(self.fd, uapi.VHOST_GET_VRING_BASE, buf, True)
        return uapi.vring_state_num(buf)

    def set_vring_base(self, index: int, base: int) -> None:
        fcntl.ioctl(self.fd, uapi.VHOST_SET_VRING_BASE, uapi.vring_state(index, base), True)

    def enable(self, index: int, enabled: bool = True) -> None:
        fcntl.ioctl(
            self.fd, uapi.VHOST_VDPA_SET_VRING_ENABLE, uapi.vring_state(index, int(enabled)), True
        )
        self.enabled[index] = enabled

    # -- what a VMM does --

    def set_up(
        self,
        memory: GuestMemory,
        rings: list[SplitRing],
        *,
        backend_mask: int = ~0,
        features: int | None = NET_FEATURES,
    ) -> None:
        """Owner, backend features, IOTLB map, ring sizes, addresses, kick and call.

        ``features`` None leaves feature negotiation (and the status) to the
        migration: a destination VMM's device waits for the source's state.
        """
        fcntl.ioctl(self.fd, uapi.VHOST_SET_OWNER)
        offered = self.ioctl_u64(uapi.VHOST_GET_BACKEND_FEATURES)
        wanted = sum(uapi.bit(b) for b in WANTED_BACKEND if offered & uapi.bit(b)) & backend_mask
        self.ioctl_u64(uapi.VHOST_SET_BACKEND_FEATURES, wanted)
        self.backend_features = wanted
        if features is not None:
            self.negotiate(features)
        batch = bool(wanted & uapi.bit(uapi.BACKEND_F_IOTLB_BATCH))
        messages = []
        if batch:
            messages.append(uapi.iotlb_message(uapi.VHOST_IOTLB_BATCH_BEGIN))
        messages.append(
            uapi.iotlb_message(
                uapi.VHOST_IOTLB_UPDATE,
                iova=memory.iova,
                size=memory.size,
                uaddr=memory.uaddr,
                perm=uapi.VHOST_ACCESS_RW,
            )
        )
        if batch:
            messages.append(uapi.iotlb_message(uapi.VHOST_IOTLB_BATCH_END))
        for message in messages:
            assert os.write(self.fd, message) == len(message)
        for ring in rings:
            i = ring.index
            fcntl.ioctl(self.fd, uapi.VHOST_SET_VRING_NUM, uapi.vring_state(i, ring.size), True)
            fcntl.ioctl(
                self.fd,
                uapi.VHOST_SET_VRING_ADDR,
                uapi.vring_addr(i, ring.desc, ring.used, ring.avail),
                True,
            )
            self.sizes[i] = ring.size
            self.kick[i] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.call[i] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fcntl.ioctl(self.fd, uapi.VHOST_SET_VRING_KICK, uapi.vring_file(i, self.kick[i]), True)
            fcntl.ioctl(self.fd, uapi.VHOST_SET_VRING_CALL, uapi.vring_file(i, self.call[i]), True)
            self.enabled[i] = False

    def negotiate(self, features: int) -> None:
        offered = self.ioctl_u64(uapi.VHOST_GET_FEATURES)
        self.features = features & offered
        self.set_status(uapi.STATUS_ACKNOWLEDGE)
        self.set_status(uapi.STATUS_ACKNOWLEDGE | uapi.STATUS_DRIVER)
        self.ioctl_u64(uapi.VHOST_SET_FEATURES, self.features)
        ok = uapi.STATUS_ACKNOWLEDGE | uapi.STATUS_DRIVER | uapi.STATUS_FEATURES_OK
        self.set_status(ok)
        assert self.status() & uapi.STATUS_FEATURES_OK, "the device refused the features"

    def start(self) -> None:
        """Enable the rings and set DRIVER_OK, as the guest's driver does."""
        for index in self.sizes:
            self.enable(index)
        self.set_status(self.status() | uapi.STATUS_DRIVER_OK)

    def notify(self, index: int) -> None:
        """Kick ring ``index`` (the guest's notification)."""
        os.eventfd_write(self.kick[index], 1)

    def calls(self, index: int) -> int:
        """Interrupts the device raised on ring ``index`` since the last look."""
        try:
            return int(os.eventfd_read(self.call[index]))
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in [*self.kick.values(), *self.call.values(), self.fd]:
            with contextlib.suppress(OSError):
                os.close(fd)


# -- the owner channel ----------------------------------------------------------------


class OwnerServer:
    """Serves the owner channel of one device from a thread of its owner.

    One JSON request per SEQPACKET message, one reply (``{"ok": true, ...}`` or
    ``{"ok": false, "error": "..."}``); the protocol is described in
    ``orchestrator.backends.vhost_vdpa``.  ``requests`` records every op, so a
    test can tell what the orchestrator asked.
    """

    def __init__(self, device: VmmDevice, path: Path) -> None:
        self.device = device
        self.path = path
        self.requests: list[str] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listener.bind(str(path))
        os.chmod(path, 0o600)
        self.listener.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                try:
                    request = json.loads(data)
                    self.requests.append(str(request.get("op")))
                    reply = {"ok": True, **self.handle(request)}
                except OSError as exc:
                    reply = {"ok": False, "error": f"{exc.strerror} (errno {exc.errno})"}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                conn.send(json.dumps(reply).encode())

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        device = self.device
        op = request["op"]
        if op == "vrings":
            return {
                "features": device.features,
                "vrings": [
                    {
                        "index": i,
                        "size": size,
                        "base": device.vring_base(i),
                        "enabled": device.enabled.get(i, False),
                    }
                    for i, size in sorted(device.sizes.items())
                ],
            }
        if op == "set_bases":
            for entry in request["vrings"]:
                index, base = int(entry["index"]), int(entry["base"])
                if index not in device.sizes:
                    raise OSError(errno.ENOENT, f"ring {index} is not set up by this VMM")
                if int(entry["size"]) != device.sizes[index]:
                    raise OSError(
                        errno.EINVAL,
                        f"ring {index} has {device.sizes[index]} entries here, "
                        f"{entry['size']} on the source",
                    )
                device.set_vring_base(index, base)
            return {}
        if op == "enable":
            for entry in request["vrings"]:
                device.enable(int(entry["index"]), bool(entry["enabled"]))
            return {}
        raise ValueError(f"unknown op {op!r}")


@contextlib.contextmanager
def owner_server(device: VmmDevice, path: Path) -> Iterator[OwnerServer]:
    server = OwnerServer(device, path)
    try:
        yield server
    finally:
        server.close()


# -- the lab's vDPA devices ------------------------------------------------------------------

VDPA_DEVICES = Path("/sys/bus/vdpa/devices")
SIM_MODULES = ("vringh", "vdpa_sim", "vdpa_sim_net")
MAC = "52:54:00:12:34:56"


def load_vdpa_modules(lab: Path) -> None:
    """vhost_iotlb, vdpa, vhost_vdpa and vduse from the kernel; the simulator from the lab."""
    for module in ("vhost_iotlb", "vdpa", "vhost_vdpa", "vduse"):
        subprocess.run(["modprobe", module], check=True)
    loaded = Path("/proc/modules").read_text()
    for module in SIM_MODULES:
        if f"{module} " not in loaded:
            subprocess.run(["insmod", str(lab / "build" / "vdpa" / f"{module}.ko")], check=True)


def vhost_node(name: str) -> Path:
    """``/dev/vhost-vdpa-N`` of the vDPA device ``name`` (bound to vhost_vdpa)."""
    nodes = [p.name for p in (VDPA_DEVICES / name).iterdir() if p.name.startswith("vhost-vdpa-")]
    assert len(nodes) == 1, f"{name} is not bound to vhost_vdpa: {nodes}"
    return Path("/dev") / nodes[0]


class VdpaDevices:
    """vDPA devices made for one test (``vdpa dev add``); deleted by :meth:`remove_all`."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.vduse: list[Vduse] = []

    def sim_net(self, name: str, mac: str = MAC) -> Path:
        subprocess.run(
            ["vdpa", "dev", "add", "mgmtdev", "vdpasim_net", "name", name, "mac", mac], check=True
        )
        self.made.append(name)
        return vhost_node(name)

    def vduse_net(self, name: str, mac: str = MAC) -> Path:
        device = Vduse(name, mac)
        self.vduse.append(device)
        subprocess.run(["vdpa", "dev", "add", "name", name, "mgmtdev", "vduse"], check=True)
        self.made.append(name)
        return vhost_node(name)

    def remove_all(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["vdpa", "dev", "del", name], check=False)
        self.made.clear()
        for device in self.vduse:
            device.destroy()
        self.vduse.clear()


class Vduse:
    """A VDUSE net device: a vDPA device whose 'hardware' is this process.

    VDUSE (``drivers/vdpa/vdpa_user``) offers no suspend, so the vhost-vdpa
    device it makes lacks the SUSPEND backend feature: a real device that
    cannot be migrated live.  A thread answers the kernel's requests (status
    changes, ring state) with "done", which is all opening it needs.
    """

    BASE = 0x81
    CONFIG = struct.Struct("=256sIIQII52xI")
    REQUEST_BYTES = 152

    def __init__(self, name: str, mac: str) -> None:
        from orchestrator.backends.vfio_uapi import IOC_WRITE, ioc

        self.name = name
        config = bytes.fromhex(mac.replace(":", "")) + struct.pack("<HHH", 1, 1, 1500)
        header = self.CONFIG.pack(
            name.encode(),
            0,
            1,  # virtio net
            uapi.bit(uapi.VIRTIO_F_VERSION_1)
            | uapi.bit(uapi.VIRTIO_F_ACCESS_PLATFORM)
            | uapi.bit(5),
            2,
            4096,
            len(config),
        )
        self.control = os.open("/dev/vduse/control", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(
            self.control,
            ioc(IOC_WRITE, self.BASE, 0x02, self.CONFIG.size),
            bytearray(header + config),
            True,
        )
        self.fd = os.open(f"/dev/vduse/{name}", os.O_RDWR | os.O_CLOEXEC)
        for index in range(2):
            setup = bytearray(struct.pack("=IH26x", index, RING_SIZE))
            fcntl.ioctl(self.fd, ioc(IOC_WRITE, self.BASE, 0x14, len(setup)), setup, True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                request = os.read(self.fd, self.REQUEST_BYTES)
            except OSError:
                return
            request_id = struct.unpack_from("=I", request, 4)[0]
            os.write(self.fd, struct.pack("=II16x128x", request_id, 0))

    def destroy(self) -> None:
        from orchestrator.backends.vfio_uapi import IOC_WRITE, ioc

        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self.fd)
        name = bytearray(self.name.encode().ljust(256, b"\0"))
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.control, ioc(IOC_WRITE, self.BASE, 0x03, 256), name, True)
        os.close(self.control)
