"""The VFIO backend on any host: uAPI encoding, device addresses, errors, bookkeeping.

The real thing runs against the kernel's mtty driver in the kernel lab
(``tests/kernel``).  Here, without a kernel that has VFIO:

* ioctl numbers and structure layouts are checked against values worked
  out by hand from ``include/uapi/linux/vfio.h`` and ``iommufd.h`` (the
  ``_IOC`` bit layout, VFIO's ``;`` type and base 100, and each structure's
  C layout), not recomputed with the module's own helpers;
* device addresses are resolved against a fake sysfs tree;
* errno becomes a DeviceError naming the ioctl, the device and the target;
* the data_fd bookkeeping, a device falling into ERROR, a reset, and
  cancellation are driven through a fake kernel behind the backend's
  ``Syscalls`` seam (real pipes stand in for data_fds).
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from pydantic import ValidationError

from orchestrator import cli
from orchestrator.backends import BACKENDS, backends_for
from orchestrator.backends import vfio_uapi as uapi
from orchestrator.backends.vfio import (
    LocateError,
    Syscalls,
    VfioBackend,
    VfioDevice,
    VfioParams,
    locate,
)
from orchestrator.errors import DeviceError, PlanError
from orchestrator.handover import HandleRegistry
from orchestrator.journal import Journal
from orchestrator.resolve import resolve
from orchestrator.service import DeviceBusy, MigrationService
from orchestrator.states import Capabilities, DeviceState, MigrationFlags, Side, is_arc
from tests.helpers import make_plan

S = DeviceState
ALL_FLAGS = MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY


def native(value: int, size: int, *, signed: bool = False) -> bytes:
    return value.to_bytes(size, sys.byteorder, signed=signed)


# --- ioctl numbers and layouts ---------------------------------------------------------


def test_vfio_ioctl_numbers() -> None:
    # _IO(';', 100 + n): type 0x3b in bits 8..15, the number in bits 0..7, no size, no dir.
    expected = {
        "VFIO_GET_API_VERSION": 0x3B64,
        "VFIO_CHECK_EXTENSION": 0x3B65,
        "VFIO_SET_IOMMU": 0x3B66,
        "VFIO_GROUP_GET_STATUS": 0x3B67,
        "VFIO_GROUP_SET_CONTAINER": 0x3B68,
        "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
        "VFIO_DEVICE_GET_INFO": 0x3B6B,
        "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C,
        "VFIO_DEVICE_RESET": 0x3B6F,
        "VFIO_DEVICE_FEATURE": 0x3B75,
        "VFIO_DEVICE_BIND_IOMMUFD": 0x3B76,
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT": 0x3B77,
        "VFIO_MIG_GET_PRECOPY_INFO": 0x3B79,
        # iommufd: _IO(';', 0x80 + n).
        "IOMMU_DESTROY": 0x3B80,
        "IOMMU_IOAS_ALLOC": 0x3B81,
    }
    for name, number in expected.items():
        assert getattr(uapi, name) == number, name
        assert uapi.ioctl_name(number) == name
    assert uapi.ioctl_name(0x1234) == "ioctl 0x1234"


def test_ioc_matches_known_kernel_numbers() -> None:
    # Numbers other subsystems publish, with a direction and a size: the bit layout.
    assert uapi.ioc(uapi.IOC_READ, "T", 0x30, 4) == 0x80045430  # TIOCGPTN
    assert uapi.ioc(uapi.IOC_WRITE, "T", 0x31, 4) == 0x40045431  # TIOCSPTLCK
    assert uapi.ioc(uapi.IOC_READ, "f", 1, 8) == 0x80086601  # FS_IOC_GETFLAGS
    assert uapi.io("T", 0x1B) == 0x541B  # FIONREAD: the tty numbers are 'T' << 8 | n
    for bad in ((4, "T", 1, 0), (0, 256, 1, 0), (0, "T", 256, 0), (0, "T", 1, 1 << 14)):
        with pytest.raises(ValueError, match=r"out of range|does not fit"):
            uapi.ioc(*bad)


def test_structure_sizes_follow_the_c_layouts() -> None:
    sizes = {
        uapi.GROUP_STATUS: 8,  # argsz, flags
        uapi.DEVICE_INFO: 24,  # argsz, flags, num_regions, num_irqs, cap_offset, pad
        uapi.REGION_INFO: 32,  # four u32, then u64 size and offset
        uapi.FEATURE_HEADER: 8,
        uapi.FEATURE_MIGRATION: 8,  # one aligned u64
        uapi.FEATURE_MIG_STATE: 8,  # u32 state, s32 data_fd
        uapi.FEATURE_MIG_DATA_SIZE: 8,
        uapi.FEATURE_DMA_LOGGING_CONTROL: 24,
        uapi.PRECOPY_INFO: 24,  # argsz, flags, then two aligned u64
        uapi.BIND_IOMMUFD: 16,
        uapi.ATTACH_IOMMUFD_PT: 12,
        uapi.IOAS_ALLOC: 12,
        uapi.IOMMU_DESTROY_ARG: 8,
    }
    for layout, size in sizes.items():
        assert layout.size == size, layout.format


def test_feature_buffers_byte_by_byte() -> None:
    assert (uapi.FeatureOp.GET, uapi.FeatureOp.SET, uapi.FeatureOp.PROBE) == (
        0x10000,
        0x20000,
        0x40000,
    )
    assert [f.value for f in uapi.Feature] == [1, 2, 6, 7, 8, 9, 12]

    buf = uapi.mig_state_request(uapi.FeatureOp.SET, int(S.STOP_COPY))
    assert bytes(buf) == native(16, 4) + native(0x20002, 4) + native(3, 4) + b"\xff" * 4
    # The kernel answers in place: the state, and the data_fd it installed.
    buf[12:16] = native(9, 4, signed=True)
    assert uapi.mig_state_result(buf) == (3, 9)

    probe = uapi.feature_request(
        uapi.Feature.DMA_LOGGING_START, uapi.FeatureOp.PROBE | uapi.FeatureOp.SET
    )
    assert bytes(probe) == native(8, 4) + native(0x60006, 4)
    get = uapi.feature_request(uapi.Feature.MIGRATION, uapi.FeatureOp.GET, 8)
    assert bytes(get) == native(16, 4) + native(0x10001, 4) + bytes(8)
    assert bytes(uapi.feature_data(get)) == bytes(8)


def test_precopy_and_region_info_layouts() -> None:
    buf = uapi.precopy_info_request()
    assert bytes(buf) == native(24, 4) + bytes(20)
    buf[8:16] = native(24, 8)
    buf[16:24] = native(5, 8)
    assert uapi.precopy_info_result(buf) == (24, 5, 0)
    buf[4:8] = native(uapi.PRECOPY_INFO_REINIT, 4)
    assert uapi.precopy_info_result(buf) == (24, 5, 1)

    region = uapi.region_info_request(1)
    assert bytes(region[:16]) == native(32, 4) + native(0, 4) + native(1, 4) + native(0, 4)
    region[4:8] = native(3, 4)
    region[16:24] = native(8, 8)
    region[24:32] = native(1 << 40, 8)
    info = uapi.region_info_result(region)
    assert (info.index, info.size, info.offset) == (1, 8, 1 << 40)
    assert info.readable and info.writable


# --- parameters ------------------------------------------------------------------------

UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def test_params_name_exactly_one_device() -> None:
    assert VfioParams(mdev=UUID.upper()).mdev == UUID
    assert VfioParams(pci="3B:00.1").pci == "0000:3b:00.1"
    assert VfioParams(pci="0001:00:1f.7").pci == "0001:00:1f.7"
    assert VfioParams(sysfs="/sys/bus/pci/devices/0000:3b:00.1/").sysfs == (
        "/sys/bus/pci/devices/0000:3b:00.1"
    )
    assert VfioParams(mdev=UUID).iommufd == "auto"
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "exactly one of mdev, pci, sysfs or handle (got none)"),
        ({"mdev": UUID, "pci": "0000:3b:00.1"}, "(got mdev and pci)"),
        ({"handle": "vm1/tty0", "sysfs": "/sys/devices/x"}, "(got sysfs and handle)"),
        ({"handle": "vm1"}, "'vm1' is not a handle: '<vm>/<device>'"),
        ({"handle": "vm1/tty0/x"}, "is not a handle"),
        ({"handle": "/tty0"}, "is not a handle"),
        ({"mdev": "not-a-uuid"}, "'not-a-uuid' is not a UUID"),
        ({"pci": "3b:00:1"}, "is not a PCI address"),
        ({"pci": "0000:3b:20.0"}, "is not a PCI address"),
        ({"sysfs": "/dev/vfio/3"}, "is not a device's sysfs path"),
        ({"sysfs": "/sys/bus/pci/devices/../../../etc"}, "is not a device's sysfs path"),
        ({"mdev": UUID, "iommufd": "sometimes"}, "Input should be 'auto', 'never' or 'require'"),
        ({"mdev": UUID, "group": 3}, "Extra inputs are not permitted"),
    ]
    for data, message in cases:
        with pytest.raises(ValidationError) as caught:
            VfioParams.model_validate(data)
        assert message in str(caught.value), data


# --- finding devices in a fake sysfs ---------------------------------------------------


def _link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent))


def fake_sysfs(root: Path) -> Path:
    """A /sys with one mdev (group 7), PCI functions on vfio-pci, e1000e and no driver."""
    sys_ = root / "sys"
    groups = sys_ / "kernel" / "iommu_groups"
    mdev = sys_ / "devices" / "virtual" / "mtty" / "mtty" / UUID
    mdev.mkdir(parents=True)
    (groups / "7").mkdir(parents=True)
    _link(mdev / "iommu_group", groups / "7")
    _link(sys_ / "bus" / "mdev" / "devices" / UUID, mdev)
    drivers = sys_ / "bus" / "pci" / "drivers"
    for address, driver, group in (
        ("0000:3b:00.1", "mlx5_vfio_pci", 12),
        ("0000:3b:00.2", "e1000e", 13),
        ("0000:3b:00.3", None, 14),
    ):
        function = sys_ / "devices" / "pci0000:3a" / address
        function.mkdir(parents=True)
        (groups / str(group)).mkdir()
        _link(function / "iommu_group", groups / str(group))
        if driver is not None:
            (drivers / driver).mkdir(parents=True, exist_ok=True)
            _link(function / "driver", drivers / driver)
        _link(sys_ / "bus" / "pci" / "devices" / address, function)
    (sys_ / "devices" / "pci0000:3a" / "0000:3b:00.1" / "vfio-dev" / "vfio3").mkdir(parents=True)
    (sys_ / "devices" / "platform" / "orphan").mkdir(parents=True)
    return sys_


def test_locate_an_mdev_a_vf_and_a_sysfs_path(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path)
    found = locate(VfioParams(mdev=UUID), root)
    assert (found.name, found.group, found.cdev, found.identity) == (UUID, 7, None, f"mdev {UUID}")
    assert found.sysfs == root / "devices" / "virtual" / "mtty" / "mtty" / UUID
    vf = locate(VfioParams(pci="3b:00.1"), root)
    assert (vf.name, vf.group, vf.cdev, vf.identity) == (
        "0000:3b:00.1",
        12,
        "vfio3",
        "PCI 0000:3b:00.1",
    )
    by_path = locate(VfioParams(sysfs="/sys/bus/pci/devices/0000:3b:00.1"), root)
    assert by_path.sysfs == vf.sysfs and by_path.group == 12


def test_locate_says_what_is_wrong(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path)
    other = str(uuid.uuid4())
    cases = [
        (VfioParams(mdev=other), "mdev", f"no mediated device {other}"),
        (VfioParams(pci="0000:3b:00.7"), "pci", "no PCI device 0000:3b:00.7"),
        (VfioParams(pci="0000:3b:00.2"), "pci", "bound to e1000e, not to a VFIO driver"),
        (VfioParams(pci="0000:3b:00.3"), "pci", "bound to no driver"),
        (VfioParams(sysfs="/sys/devices/nowhere"), "sysfs", "no device at /sys/devices/nowhere"),
        (VfioParams(sysfs="/sys/devices/platform/orphan"), "sysfs", "no IOMMU group and no VFIO"),
    ]
    for params, field, message in cases:
        with pytest.raises(LocateError) as caught:
            locate(params, root)
        assert caught.value.field == field
        assert message in caught.value.message


def vfio_plan(source: dict[str, Any], destination: dict[str, Any]) -> Any:
    return make_plan(
        [{"name": "vf0", "backend": "vfio", "source": source, "destination": destination}]
    )


def test_plans_are_checked_against_the_devices_present(tmp_path: Path) -> None:
    backends = {"vfio": VfioBackend(sysfs_root=fake_sysfs(tmp_path))}
    resolved = resolve(vfio_plan({"mdev": UUID}, {"pci": "0000:3b:00.1"}), backends)
    (device,) = resolved.devices
    assert device.source_capabilities is None  # only the device can tell
    assert isinstance(device.destination, VfioParams) and device.destination.iommufd == "auto"

    with pytest.raises(PlanError) as caught:
        resolve(vfio_plan({"mdev": UUID}, {"mdev": UUID, "pci": "0000:3b:00.1"}), backends)
    assert [str(p) for p in caught.value.problems] == [
        "devices[0].destination: Value error, name the device by exactly one of mdev, pci, "
        "sysfs or handle (got mdev and pci)"
    ]
    with pytest.raises(PlanError) as caught:
        resolve(vfio_plan({"mdev": UUID, "iommufd": "require"}, {"mdev": UUID}), backends)
    assert [p.path for p in caught.value.problems] == [
        "devices[0].source.iommufd",
        "devices[0].destination.iommufd",  # inherited from the source
        "devices[0].destination.mdev",
    ]
    assert "the destination is the source device itself" in str(caught.value)
    with pytest.raises(PlanError, match=r"devices\[0\]\.source\.pci: .*bound to e1000e"):
        resolve(vfio_plan({"pci": "0000:3b:00.2"}, {"mdev": UUID}), backends)


def test_the_registry_has_the_vfio_backend() -> None:
    assert isinstance(BACKENDS["vfio"], VfioBackend)
    assert BACKENDS["vfio"].sysfs_root == Path("/sys")


def test_validate_a_plan_naming_a_missing_mdev(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(uuid.uuid4())  # no host has this one
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'vm = "vm1"\ndowntime_limit_ms = 300\n[[devices]]\nname = "vf0"\nbackend = "vfio"\n'
        f'source = {{ mdev = "{missing}" }}\ndestination = {{ pci = "ffff:ff:1f.7" }}\n'
    )
    assert cli.main(["validate", str(plan)]) == cli.ExitStatus.BAD_INPUT
    out = capsys.readouterr().out
    assert f"devices[0].source.mdev: no mediated device {missing}" in out
    assert "devices[0].destination.pci: no PCI device ffff:ff:1f.7" in out
    assert "Traceback" not in out


# --- errors from a descriptor that is not a VFIO device ------------------------------------


async def test_errno_names_the_ioctl_the_device_and_the_state() -> None:
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        device = VfioDevice.from_fd("gpu0", Side.SOURCE, fd, identity="PCI 0000:3b:00.1")
        with pytest.raises(DeviceError) as caught:
            await device.open()
        error = caught.value
        assert (error.device, error.operation, error.errno) == (
            "gpu0",
            "VFIO_DEVICE_FEATURE(MIGRATION)",
            errno.ENOTTY,
        )
        assert str(error) == (
            "device 'gpu0' VFIO_DEVICE_FEATURE(MIGRATION): PCI 0000:3b:00.1: "
            f"{os.strerror(errno.ENOTTY)}; the device's driver does not support migration "
            f"(errno {errno.ENOTTY})"
        )
        with pytest.raises(DeviceError) as caught:
            await device.set_state(S.STOP)
        assert (caught.value.operation, caught.value.target) == (
            "VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)",
            "STOP",
        )
        await device.close()
        await device.close()
        with pytest.raises(DeviceError, match="the device is closed"):
            await device.get_state()
        # The caller's descriptor is its own: still open.
        os.fstat(fd)
    finally:
        os.close(fd)
    with pytest.raises(DeviceError, match="cannot duplicate") as caught:
        VfioDevice.from_fd("gpu0", Side.SOURCE, fd)
    assert caught.value.errno == errno.EBADF


async def test_opening_a_missing_device_is_a_device_error(tmp_path: Path) -> None:
    backend = VfioBackend(sysfs_root=fake_sysfs(tmp_path), dev_root=tmp_path / "dev")
    device = backend.create("tty0", Side.SOURCE, VfioParams(mdev=UUID))
    with pytest.raises(DeviceError) as caught:
        await device.open()
    assert caught.value.errno == errno.ENOENT
    assert caught.value.operation == f"open({tmp_path / 'dev' / 'vfio' / 'vfio'})"
    assert "is the vfio module loaded?" in str(caught.value)
    await device.close()
    # The failed open gave its claim on the device back.
    again = backend.create("tty0", Side.SOURCE, VfioParams(mdev=UUID))
    with pytest.raises(DeviceError) as caught:
        await again.open()
    assert caught.value.errno == errno.ENOENT
    await again.close()


# --- a fake kernel behind the Syscalls seam --------------------------------------------------

DEVICE_FD = 10_000  # the fake device's descriptor number; never a real one


class FakeKernel(Syscalls):
    """One VFIO migration device in the manner of the uAPI, with pipes for data_fds.

    A saving arc that opens a stream returns the read end of a pipe (the test
    feeds the write end); RESUMING returns a write end whose bytes go to
    ``loaded``.  Knobs make the next SET fail (and leave a given state),
    make an arc that carries a stream return a new fd, or make reads fail.
    """

    def __init__(self, flags: MigrationFlags = ALL_FLAGS, *, logging: bool = False) -> None:
        self.flags = flags
        self.logging = logging
        self.state = S.RUNNING
        self.fail_next: tuple[int, DeviceState] | None = None
        self.new_fd_on_carry = False
        self.read_errno: int | None = None
        #: When set, poll blocks until the test opens the gate, then says "not ready".
        self.poll_gate: threading.Event | None = None
        self.feed: int | None = None  # write end of a save stream's pipe
        self.loaded = bytearray()
        self.handed: set[int] = set()  # data_fds given out and not closed yet
        self.closed: list[int] = []
        self.lock = threading.Lock()

    def dup(self, fd: int) -> int:
        return DEVICE_FD

    def close(self, fd: int) -> None:
        with self.lock:
            self.closed.append(fd)
            self.handed.discard(fd)
        if fd != DEVICE_FD:
            os.close(fd)

    def open_data_fds(self) -> set[int]:
        with self.lock:
            return set(self.handed)

    def _stream(self, saving: bool) -> int:
        read_end, write_end = os.pipe()
        if saving:
            self.feed = write_end
            handed = read_end
        else:
            os.close(read_end)
            handed = write_end
        with self.lock:
            self.handed.add(handed)
        return handed

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        if request == uapi.VFIO_DEVICE_RESET:
            self.state = S.RUNNING
            return 0
        if request == uapi.VFIO_MIG_GET_PRECOPY_INFO:
            assert isinstance(arg, bytearray)
            arg[8:24] = struct.pack("=QQ", 24, 8)
            return 0
        assert fd == DEVICE_FD and request == uapi.VFIO_DEVICE_FEATURE
        assert isinstance(arg, bytearray)
        argsz, flags = uapi.FEATURE_HEADER.unpack_from(arg)
        assert argsz == len(arg)
        feature = flags & uapi.FEATURE_MASK
        if flags & uapi.FeatureOp.PROBE:
            supported = feature == uapi.Feature.MIG_DATA_SIZE or (
                feature == uapi.Feature.DMA_LOGGING_START and self.logging
            )
            if not supported:
                raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
            return 0
        if feature == uapi.Feature.MIGRATION:
            arg[8:16] = native(int(self.flags) | 0x100, 8)  # an unknown bit is ignored
        elif feature == uapi.Feature.MIG_DATA_SIZE:
            arg[8:16] = native(4096, 8)
        elif feature == uapi.Feature.MIG_DEVICE_STATE and flags & uapi.FeatureOp.GET:
            arg[8:16] = uapi.FEATURE_MIG_STATE.pack(int(self.state), -1)
        elif feature == uapi.Feature.MIG_DEVICE_STATE:
            target = S(uapi.FEATURE_MIG_STATE.unpack_from(arg, 8)[0])
            if self.fail_next is not None:
                err, self.state = self.fail_next
                self.fail_next = None
                raise OSError(err, os.strerror(err))
            if not is_arc(self.flags, self.state, target):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            data_fd = -1
            saving = {S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY}
            if target is S.RESUMING:
                data_fd = self._stream(saving=False)
            elif target in saving and (self.state not in saving or self.new_fd_on_carry):
                data_fd = self._stream(saving=True)
            self.state = target
            arg[8:16] = uapi.FEATURE_MIG_STATE.pack(int(target), data_fd)
        return 0

    def readinto(self, fd: int, buffer: memoryview) -> int:
        if self.read_errno is not None:
            raise OSError(self.read_errno, os.strerror(self.read_errno))
        return os.readv(fd, [buffer])

    def poll(self, fd: int, events: int, timeout_ms: int) -> bool:
        if self.poll_gate is None:
            return super().poll(fd, events, timeout_ms)
        self.poll_gate.wait()
        return False

    def write(self, fd: int, data: memoryview) -> int:
        taken = bytes(data[:7])  # a device that takes a few bytes at a time
        self.loaded += taken
        return len(taken)


async def fake_device(kernel: FakeKernel, side: Side = Side.SOURCE) -> VfioDevice:
    device = VfioDevice.from_fd("dev0", side, 3, identity="mdev fake", syscalls=kernel)
    caps = await device.open()
    assert caps == Capabilities(flags=kernel.flags, stop_copy_size=True, dirty_logging=False)
    assert device.opened_by == "fd"
    return device


async def test_a_save_stream_keeps_one_data_fd_from_pre_copy_to_its_end() -> None:
    kernel = FakeKernel()
    device = await fake_device(kernel)
    await device.set_state(S.PRE_COPY)
    assert kernel.feed is not None
    (data_fd,) = kernel.open_data_fds()
    os.write(kernel.feed, b"abc")
    assert await device.read(100) == b"abc"
    assert await device.read(100) == b""  # nothing more now: the pipe is empty
    info = await device.precopy_info()
    assert (info.initial_bytes, info.dirty_bytes) == (24, 8)
    assert await device.stop_copy_size() == 4096
    kernel.read_errno = errno.ENOMSG
    os.write(kernel.feed, b"d")
    assert await device.read(100) == b""  # the uAPI's temporary end of pre-copy data
    kernel.read_errno = None
    assert await device.read(100) == b"d"

    await device.set_state(S.PRE_COPY_P2P)
    await device.set_state(S.STOP_COPY)
    assert kernel.open_data_fds() == {data_fd}  # carried on: no second stream
    os.write(kernel.feed, b"ef")
    os.close(kernel.feed)
    assert await device.read(1) == b"e"
    assert await device.read(100) == b"f"
    assert await device.read(100) == b""  # the end of the stream
    assert await device.read(100) == b""
    with pytest.raises(DeviceError, match="precopy info exists only in PRE_COPY states"):
        await device.precopy_info()
    await device.set_state(S.STOP)
    assert kernel.open_data_fds() == set()
    assert await device.state_digest() == hashlib.sha256(b"abcdef").hexdigest()
    with pytest.raises(DeviceError, match="no save stream to read in STOP"):
        await device.read(1)
    await device.close()
    assert DEVICE_FD in kernel.closed


#: A cancel event nobody sets: the blocking side's calls run to their end.
NEVER = threading.Event()


async def test_the_blocking_side_reads_and_loads_the_data_fd_as_read_and_write_do() -> None:
    # What a data channel's thread calls: the same stream, into and out of its buffers.
    kernel = FakeKernel()
    device = await fake_device(kernel)
    reader = device.bulk_reader()
    buffer = memoryview(bytearray(8))
    with pytest.raises(DeviceError, match="no save stream to read in RUNNING"):
        await trio.to_thread.run_sync(reader.read_into, buffer, NEVER)
    await device.set_state(S.PRE_COPY)
    assert kernel.feed is not None
    os.write(kernel.feed, b"abc")
    assert await trio.to_thread.run_sync(reader.read_into, buffer, NEVER) == 3
    assert bytes(buffer[:3]) == b"abc"
    assert await trio.to_thread.run_sync(reader.read_into, buffer, NEVER) == 0  # nothing more now
    kernel.read_errno = errno.ENOMSG
    assert await trio.to_thread.run_sync(reader.read_into, buffer, NEVER) == 0
    kernel.read_errno = None
    await device.set_state(S.PRE_COPY_P2P)
    await device.set_state(S.STOP_COPY)
    os.write(kernel.feed, b"defghijkl")
    os.close(kernel.feed)
    assert await trio.to_thread.run_sync(reader.read_into, buffer, NEVER) == 8
    assert await trio.to_thread.run_sync(reader.read_into, buffer, NEVER) == 1
    assert await trio.to_thread.run_sync(reader.read_into, buffer, NEVER) == 0  # the end
    await device.set_state(S.STOP)
    assert await device.state_digest() == hashlib.sha256(b"abcdefghijkl").hexdigest()
    await device.close()
    with pytest.raises(DeviceError, match="closed"):
        await trio.to_thread.run_sync(reader.read_into, buffer, NEVER)

    kernel = FakeKernel()
    device = await fake_device(kernel, Side.DESTINATION)
    writer = device.bulk_writer()
    for state in (S.RUNNING_P2P, S.STOP, S.RESUMING):
        await device.set_state(state)
    await trio.to_thread.run_sync(writer.write_from, memoryview(b"0123456789abcdef"), NEVER)
    assert bytes(kernel.loaded) == b"0123456789abcdef"  # taken 7 bytes at a time
    await device.set_state(S.STOP)
    with pytest.raises(DeviceError, match="loads only in RESUMING"):
        await trio.to_thread.run_sync(writer.write_from, memoryview(b"x"), NEVER)
    await device.close()


async def test_enomsg_in_stop_copy_is_a_protocol_error() -> None:
    kernel = FakeKernel(MigrationFlags.STOP_COPY)
    device = await fake_device(kernel)
    await device.set_state(S.STOP)
    await device.set_state(S.STOP_COPY)
    assert kernel.feed is not None
    os.write(kernel.feed, b"x")
    kernel.read_errno = errno.ENOMSG
    with pytest.raises(DeviceError, match="STOP_COPY must not give it") as caught:
        await device.read(10)
    assert (caught.value.operation, caught.value.errno) == ("read(data_fd)", errno.ENOMSG)
    await device.close()
    assert kernel.open_data_fds() == set()


async def test_a_failed_arc_into_error_then_a_reset() -> None:
    kernel = FakeKernel()
    device = await fake_device(kernel)
    await device.set_state(S.PRE_COPY)
    kernel.fail_next = (errno.EIO, S.ERROR)
    with pytest.raises(DeviceError) as caught:
        await device.set_state(S.PRE_COPY_P2P)
    error = caught.value
    assert (error.operation, error.target, error.errno) == (
        "VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)",
        "PRE_COPY_P2P",
        errno.EIO,
    )
    assert "PRE_COPY -> PRE_COPY_P2P refused; the device reads ERROR now" in str(error)
    assert await device.get_state() is S.ERROR
    assert kernel.open_data_fds() == set()  # the stream died with the state
    with pytest.raises(DeviceError, match="no save stream to read in ERROR"):
        await device.read(1)
    await device.reset()
    assert await device.get_state() is S.RUNNING

    # A failure that leaves the device where it was keeps its stream.
    await device.set_state(S.PRE_COPY)
    kernel.fail_next = (errno.EAGAIN, S.PRE_COPY)
    with pytest.raises(DeviceError, match="the device reads PRE_COPY now"):
        await device.set_state(S.PRE_COPY_P2P)
    assert len(kernel.open_data_fds()) == 1
    await device.reset()
    assert kernel.open_data_fds() == set()
    await device.close()


async def test_a_second_data_fd_for_a_carried_stream_is_refused() -> None:
    kernel = FakeKernel()
    device = await fake_device(kernel)
    await device.set_state(S.PRE_COPY)
    (first,) = kernel.open_data_fds()
    kernel.new_fd_on_carry = True
    with pytest.raises(DeviceError, match="returned a new data_fd while the stream was open"):
        await device.set_state(S.PRE_COPY_P2P)
    assert kernel.open_data_fds() == {first}
    await device.close()
    assert kernel.open_data_fds() == set()


async def test_resuming_writes_the_whole_stream() -> None:
    kernel = FakeKernel()
    device = await fake_device(kernel, Side.DESTINATION)
    with pytest.raises(DeviceError, match="loads only in RESUMING, not RUNNING"):
        await device.write(b"x")
    for state in (S.RUNNING_P2P, S.STOP, S.RESUMING):
        await device.set_state(state)
    data = bytes(range(256)) * 3
    await device.write(data[:100])
    await device.write(data[100:])
    assert bytes(kernel.loaded) == data
    await device.set_state(S.STOP)
    assert kernel.open_data_fds() == set()
    assert await device.state_digest() == hashlib.sha256(data).hexdigest()
    await device.close()
    assert await device.state_digest() == hashlib.sha256(data).hexdigest()


async def test_a_cancelled_read_never_has_its_fd_closed_under_it() -> None:
    kernel = FakeKernel(MigrationFlags.STOP_COPY)
    device = await fake_device(kernel)
    await device.set_state(S.STOP)
    await device.set_state(S.STOP_COPY)
    (data_fd,) = kernel.open_data_fds()
    kernel.poll_gate = gate = threading.Event()
    # Nothing to read and the stream not ended: the read waits, in a worker thread.
    with trio.move_on_after(0.1) as scope:
        await device.read(10)
    assert scope.cancelled_caught
    await device.close()
    # The abandoned worker is still in poll: nothing it may still use is closed yet.
    assert data_fd in kernel.open_data_fds()
    assert DEVICE_FD not in kernel.closed
    gate.set()
    # At its next poll slice it sees the cancel and leaves; the last one out closes all.
    for _ in range(500):
        if data_fd not in kernel.open_data_fds() and DEVICE_FD in kernel.closed:
            break
        await trio.sleep(0.01)
    assert data_fd not in kernel.open_data_fds() and DEVICE_FD in kernel.closed
    with pytest.raises(DeviceError, match="the device is closed"):
        await device.read(1)


# --- devices by handle ----------------------------------------------------------------------


def handed_over(kind: str = "vfio", device: str = "tty0") -> tuple[HandleRegistry, int]:
    """A registry holding /dev/null as ``vm1/<device>``; returns the registry's own fd."""
    registry = HandleRegistry()
    registry.register_vm(1, "vm1")
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    registry.hand_over(1, "vm1", device, kind, fd)
    return registry, fd


class HandedKernel(FakeKernel):
    """The fake kernel's device behind a real descriptor: /dev/null stands for it.

    Device ioctls must come on a descriptor of /dev/null (the backend's duplicate of
    the handed-over one); the fake device answers them.
    """

    NULL = os.stat(os.devnull).st_rdev

    def __init__(self) -> None:
        super().__init__()
        self.device_fds: set[int] = set()

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        if request in (uapi.VFIO_DEVICE_FEATURE, uapi.VFIO_DEVICE_RESET):
            assert os.fstat(fd).st_rdev == self.NULL
            self.device_fds.add(fd)
            fd = DEVICE_FD
        return super().ioctl(fd, request, arg)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def test_a_device_by_handle_works_on_its_own_duplicate() -> None:
    registry, registry_fd = handed_over()
    try:
        kernel = HandedKernel()
        backend = VfioBackend(syscalls=kernel).with_handles(registry)
        assert backend.handles is registry
        device = backend.create("tty0", Side.SOURCE, VfioParams(handle="vm1/tty0"))
        caps = await device.open()
        assert caps.flags == ALL_FLAGS
        assert device.opened_by == "handle" and device.identity == "handle vm1/tty0"
        # Its own descriptor of the device, not the registry's.
        (own,) = kernel.device_fds
        assert own != registry_fd
        assert os.readlink(f"/proc/self/fd/{own}") == os.devnull
        await device.set_state(S.RUNNING_P2P)
        assert await device.get_state() is S.RUNNING_P2P
        await device.close()
        assert own in kernel.closed and registry_fd not in kernel.closed
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(own)
        # The registry (and through it the VMM) keeps the device.
        os.fstat(registry_fd)
        assert registry.lookup("vm1/tty0") is not None
    finally:
        registry.close_all()


async def test_a_handle_that_cannot_be_opened_is_a_device_error_naming_it() -> None:
    registry, _ = handed_over("vhost_vdpa", "nic0")
    try:
        backend = VfioBackend(syscalls=HandedKernel()).with_handles(registry)
        cases = [
            (backend, "vm1/tty9", errno.ENODEV, "no device is handed over under this handle"),
            (backend, "vm1/nic0", errno.EINVAL, "handed over as a vhost_vdpa device, not a vfio"),
            (VfioBackend(), "vm1/nic0", errno.ENODEV, "need the daemon's handover socket"),
        ]
        for owner, handle, err, message in cases:
            before = open_fds()
            device = owner.create("tty0", Side.DESTINATION, VfioParams(handle=handle))
            with pytest.raises(DeviceError) as caught:
                await device.open()
            assert f"handle {handle!r}: " in str(caught.value) and message in str(caught.value)
            assert (caught.value.device, caught.value.operation) == ("tty0", "open")
            assert caught.value.errno == err
            await device.close()
            assert open_fds() == before
    finally:
        registry.close_all()


def test_the_daemon_s_backends_open_handles_from_its_registry(tmp_path: Path) -> None:
    registry = HandleRegistry()
    assert backends_for(None) is BACKENDS
    in_memory = backends_for(None, handles=registry)
    vfio = in_memory["vfio"]
    assert isinstance(vfio, VfioBackend) and vfio.handles is registry
    assert BACKENDS["vfio"].handles is None  # type: ignore[attr-defined]
    assert in_memory["simulated"] is BACKENDS["simulated"]
    persistent = backends_for(tmp_path, handles=registry)
    assert persistent["simulated"] is not BACKENDS["simulated"]
    assert persistent["vfio"].handles is registry  # type: ignore[attr-defined]


def handle_plan(source: str, destination: str, vm: str = "vm1") -> Any:
    device = {
        "name": "tty0",
        "backend": "vfio",
        "source": {"handle": source},
        "destination": {"handle": destination},
    }
    return make_plan([device], vm=vm)


def test_plans_name_handed_over_devices_by_handle() -> None:
    registry, _ = handed_over(device="src")
    try:
        registry.hand_over(1, "vm1", "dst", "vfio", os.open(os.devnull, os.O_RDWR))
        registry.hand_over(1, "vm1", "nic0", "vhost_vdpa", os.open(os.devnull, os.O_RDWR))
        backends = backends_for(None, handles=registry)
        resolved = resolve(handle_plan("vm1/src", "vm1/dst"), backends, registry)
        assert resolved.handles() == ["vm1/src", "vm1/dst"]
        assert resolved.device_keys() == ["vfio:handle:vm1/src", "vfio:handle:vm1/dst"]
        cases = [
            (("vm1/src", "vm1/src"), "destination.handle", "the destination is the source"),
            (("vm1/src", "vm1/nic0"), "destination.handle", "handed over as a vhost_vdpa device"),
            (("vm1/src", "vm1/gone"), "destination.handle", "no device is handed over as"),
            (("vm1/src", "vm1"), "destination.handle", "'vm1' is not a handle"),
        ]
        for (source, destination), where, message in cases:
            with pytest.raises(PlanError) as caught:
                resolve(handle_plan(source, destination), backends, registry)
            paths = {p.path: p.message for p in caught.value.problems}
            assert message in paths[f"devices[0].{where}"], paths
        with pytest.raises(PlanError, match="a device of VM 'vm1', and the plan migrates 'vm2'"):
            resolve(handle_plan("vm1/src", "vm1/dst", vm="vm2"), backends, registry)
    finally:
        registry.close_all()


def test_orchestrator_run_refuses_handles_it_cannot_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'vm = "vm1"\ndowntime_limit_ms = 300\n[[devices]]\nname = "tty0"\nbackend = "vfio"\n'
        'source = { handle = "vm1/src" }\ndestination = { handle = "vm1/dst" }\n'
    )
    assert cli.main(["run", str(plan)]) == cli.ExitStatus.BAD_INPUT
    err = capsys.readouterr().err
    assert "devices[0].source.handle: devices by handle need the daemon's handover socket" in err
    assert "devices[0].destination.handle: devices by handle need" in err
    assert "Traceback" not in err
    # `validate` checks the plan's shape: it is a good plan for a daemon.
    assert cli.main(["validate", str(plan)]) == cli.ExitStatus.SUCCEEDED


# --- device locks on the host identity ----------------------------------------------------


def test_device_keys_are_the_device_s_host_identity(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path)
    backend = VfioBackend(sysfs_root=root)
    mdev_dir = root / "devices" / "virtual" / "mtty" / "mtty" / UUID
    vf_dir = root / "devices" / "pci0000:3a" / "0000:3b:00.1"
    by_mdev = VfioParams(mdev=UUID)
    by_path = VfioParams(sysfs=f"/sys/devices/virtual/mtty/mtty/{UUID}")
    by_pci = VfioParams(pci="3b:00.1")
    by_pci_path = VfioParams(sysfs="/sys/bus/pci/devices/0000:3b:00.1")
    assert backend.device_keys("a", by_mdev, by_pci) == [f"vfio:{mdev_dir}", f"vfio:{vf_dir}"]
    assert backend.device_keys("b", by_path, by_pci_path) == [f"vfio:{mdev_dir}", f"vfio:{vf_dir}"]
    gone = VfioParams(mdev=str(uuid.UUID(int=1)))
    assert backend.device_keys("c", VfioParams(handle="vm1/x"), gone) == [
        "vfio:handle:vm1/x",
        f"vfio:mdev {uuid.UUID(int=1)}",
    ]
    # The simulated backend keeps the plan's name.
    simulated = BACKENDS["simulated"]
    params = simulated.params_model.model_validate({})
    assert simulated.device_keys("gpu0", params, params) == ["simulated:gpu0"]


def test_one_plan_naming_one_device_twice_is_refused(tmp_path: Path) -> None:
    backends = {"vfio": VfioBackend(sysfs_root=fake_sysfs(tmp_path))}
    devices = [
        {
            "name": "a",
            "backend": "vfio",
            "source": {"mdev": UUID},
            "destination": {"pci": "3b:00.1"},
        },
        {
            "name": "b",
            "backend": "vfio",
            "source": {"sysfs": "/sys/bus/pci/devices/0000:3b:00.1"},
            "destination": {"sysfs": f"/sys/bus/mdev/devices/{UUID}"},
        },
    ]
    with pytest.raises(PlanError) as caught:
        resolve(make_plan(devices), backends)
    assert [p.path for p in caught.value.problems] == ["devices[1]", "devices[1]"]
    assert "device 'b' names the same device as 'a' (devices[0]): vfio:" in str(caught.value)


class GatedOpen(Syscalls):
    """Opens wait for the test's gate, then fail: a migration held in its open."""

    def __init__(self, openers: int) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.waiting = 0
        self.openers = openers
        #: Set once ``openers`` opens wait at the gate together.
        self.all_waiting = trio.Event()

    def open(self, path: Path, flags: int) -> int:
        with self.lock:
            self.waiting += 1
            everyone = self.waiting == self.openers
        if everyone:
            trio.from_thread.run_sync(self.all_waiting.set)
        self.gate.wait(30)
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))


async def test_the_service_locks_real_devices_by_host_identity(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "host")
    syscalls = GatedOpen(openers=2)
    backends = {"vfio": VfioBackend(sysfs_root=root, dev_root=tmp_path / "dev", syscalls=syscalls)}
    mdev_key = f"vfio:{root / 'devices' / 'virtual' / 'mtty' / 'mtty' / UUID}"

    def plan(vm: str, name: str, source: dict[str, str], destination: dict[str, str]) -> Any:
        device = {"name": name, "backend": "vfio", "source": source, "destination": destination}
        return make_plan([device], vm=vm)

    first_plan = plan("vm1", "tty0", {"mdev": UUID}, {"pci": "3b:00.1"})
    # The same mdev under another name and its sysfs path: the same device.
    same = plan("vm2", "serial", {"sysfs": f"/sys/bus/mdev/devices/{UUID}"}, {"pci": "3b:00.1"})
    async with await Journal.open(tmp_path / "state") as journal:
        service = MigrationService(journal, backends=backends)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            first, _ = await service.submit(first_plan)
            with trio.fail_after(10):
                # Both endpoints are being opened, in parallel: the source's slow
                # group holds up no other group's open.
                await syscalls.all_waiting.wait()
            with pytest.raises(DeviceBusy) as busy:
                await service.submit(same)
            assert f"{mdev_key} (migration {first.id})" in str(busy.value)
            listed = {d.device: d for d in service.devices()}
            assert listed[mdev_key].migration == first.id and listed[mdev_key].name == "tty0"
            syscalls.gate.set()
            async for _ in service.follow(first.id):
                pass
            # The fake device's state is not where a migration starts: refused.
            assert (await service.status(first.id)).outcome == "refused"
            # Free again once the first migration ended.
            again, created = await service.submit(same)
            assert created
            async for _ in service.follow(again.id):
                pass
            await service.shutdown(grace_s=5)
            nursery.cancel_scope.cancel()


def test_a_devices_model_for_the_arc_history_is_its_mdev_type_or_pci_ids(
    tmp_path: Path,
) -> None:
    from orchestrator.backends.vfio import _model_of

    root = fake_sysfs(tmp_path)
    mdev = locate(VfioParams(mdev=UUID), root).sysfs
    types = root / "devices" / "virtual" / "mtty" / "mtty" / "mdev_supported_types" / "mtty-2"
    types.mkdir(parents=True)
    _link(mdev / "mdev_type", types)
    assert _model_of(mdev) == "vfio/mdev:mtty-2"
    vf = locate(VfioParams(pci="3b:00.1"), root).sysfs
    (vf / "vendor").write_text("0x15b3\n")
    (vf / "device").write_text("0x101e\n")
    assert _model_of(vf) == "vfio/pci:0x15b3:0x101e:mlx5_vfio_pci"
    # Nothing to tell it by: no history is kept for it.
    assert _model_of(root / "devices" / "platform" / "orphan") is None


# --- identities ------------------------------------------------------------------------------


def _pci_files(function: Path, **ids: str) -> None:
    for name, value in ids.items():
        (function / name).write_text(f"{value}\n")


def test_a_pci_functions_identity_is_its_ids_driver_and_version(tmp_path: Path) -> None:
    from orchestrator.backends.vfio_identity import sysfs_fields

    root = fake_sysfs(tmp_path)
    vf = locate(VfioParams(pci="3b:00.1"), root).sysfs
    _pci_files(
        vf,
        vendor="0x15b3",
        device="0x101e",
        subsystem_vendor="0x15b3",
        subsystem_device="0x0083",
        revision="0x00",
    )
    module = root / "module" / "mlx5_vfio_pci"
    module.mkdir(parents=True)
    (module / "version").write_text("24.10-1.1.4\n")
    _link(root / "bus" / "pci" / "drivers" / "mlx5_vfio_pci" / "module", module)
    assert sysfs_fields(vf, root) == {
        "vendor": "0x15b3",
        "device": "0x101e",
        "subsystem_vendor": "0x15b3",
        "subsystem_device": "0x0083",
        "revision": "0x00",
        "driver": "mlx5_vfio_pci",
        "driver_version": "24.10-1.1.4",
    }


def test_an_mdevs_identity_is_its_type(tmp_path: Path) -> None:
    from orchestrator.backends.vfio_identity import sysfs_fields, vfio_identity
    from orchestrator.compat import compare

    root = fake_sysfs(tmp_path)
    mdev = locate(VfioParams(mdev=UUID), root).sysfs
    types = root / "devices" / "virtual" / "mtty" / "mtty" / "mdev_supported_types"
    (types / "mtty-1").mkdir(parents=True)
    (types / "mtty-2").mkdir(parents=True)
    _link(mdev / "mdev_type", types / "mtty-2")
    (root / "module" / "mtty").mkdir(parents=True)
    (root / "module" / "mtty" / "version").write_text("0.1\n")
    fields = sysfs_fields(mdev, root)
    assert fields == {"mdev_type": "mtty-2", "driver": "mtty", "driver_version": "0.1"}
    caps = Capabilities(ALL_FLAGS)
    two = vfio_identity(fields, caps)
    assert two.model == "mtty-2"
    assert two.fields["migration"] == ("P2P", "PRE_COPY", "STOP_COPY")
    one = vfio_identity({**fields, "mdev_type": "mtty-1"}, caps)
    (mismatch,) = compare("tty0", one, two, needs=("STOP_COPY",)).mismatches
    assert mismatch.message == (
        "device 'tty0': mdev_type differs: source 'mtty-1', destination 'mtty-2'"
    )


def config_header(vendor: int, device: int, revision: int, sub_vendor: int, sub: int) -> bytes:
    config = bytearray(0x30)
    struct.pack_into("<HH", config, 0, vendor, device)
    config[8] = revision
    struct.pack_into("<HH", config, 0x2C, sub_vendor, sub)
    return bytes(config)


class ConfigKernel(FakeKernel):
    """The fake device with a PCI config region (index 7) at a region offset, and a
    descriptor that reads as ``fd_path``."""

    OFFSET = 7 << 40

    def __init__(
        self, config: bytes, fd_path: str = "anon_inode:[vfio-device]", fd_info: str = ""
    ) -> None:
        super().__init__()
        self.config = config
        self.path = fd_path
        self.info = fd_info

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        if request != uapi.VFIO_DEVICE_GET_REGION_INFO:
            return super().ioctl(fd, request, arg)
        assert isinstance(arg, bytearray) and fd == DEVICE_FD
        index = uapi.REGION_INFO.unpack(arg)[2]
        if index != uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        flags = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
        arg[:] = uapi.REGION_INFO.pack(len(arg), flags, index, 0, 256, self.OFFSET)
        return 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        assert fd == DEVICE_FD and offset == self.OFFSET
        return self.config[:size]

    def fd_path(self, fd: int) -> str:
        return self.path

    def fd_info(self, fd: int) -> str:
        return self.info


async def test_a_handed_over_descriptor_is_known_by_its_config_space() -> None:
    # A group's device descriptor names no sysfs directory: its config space tells.
    kernel = ConfigKernel(config_header(0x4348, 0x3253, 0x10, 0x4348, 0x3253))
    device = await fake_device(kernel)
    identity = await device.device_identity()
    assert identity.model == "0x4348:0x3253"
    assert identity.fields == {
        "vendor": "0x4348",
        "device": "0x3253",
        "revision": "0x10",
        "subsystem_vendor": "0x4348",
        "subsystem_device": "0x3253",
        "migration": ("P2P", "PRE_COPY", "STOP_COPY"),
    }


async def test_a_handed_over_cdev_is_traced_back_to_its_device(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path)
    vf = locate(VfioParams(pci="3b:00.1"), root).sysfs
    _pci_files(vf, vendor="0x10de", device="0x2330", revision="0xa1")
    _link(root / "class" / "vfio-dev" / "vfio3" / "device", vf)
    kernel = ConfigKernel(b"", fd_path="/dev/vfio/devices/vfio3")
    device = await fake_device(kernel)
    device.sysfs_root = root
    identity = await device.device_identity()
    assert identity.model == "0x10de:0x2330"
    assert identity.fields["driver"] == "mlx5_vfio_pci"
    assert identity.fields["revision"] == "0xa1"


async def test_a_group_descriptor_is_traced_by_its_fdinfo(tmp_path: Path) -> None:
    # Kernels that print vfio-device-syspath in fdinfo name the device of any descriptor.
    root = fake_sysfs(tmp_path)
    mdev = locate(VfioParams(mdev=UUID), root).sysfs
    types = root / "devices" / "virtual" / "mtty" / "mtty" / "mdev_supported_types"
    (types / "mtty-1").mkdir(parents=True)
    _link(mdev / "mdev_type", types / "mtty-1")
    info = f"pos:\t0\nflags:\t02000002\nvfio-device-syspath: /sys/bus/mdev/devices/{UUID}\n"
    kernel = ConfigKernel(config_header(0x4348, 0x3253, 0, 0x4348, 0x3253), fd_info=info)
    device = await fake_device(kernel)
    device.sysfs_root = root
    identity = await device.device_identity()
    assert identity.model == "mtty-1"
    assert identity.fields["vendor"] == "0x4348"  # an mdev's IDs: its config space


def test_vfio_accept_differences_name_its_fields() -> None:
    backend = VfioBackend()
    assert "driver_version" in backend.identity_fields
    assert "mdev_type" in backend.identity_fields
