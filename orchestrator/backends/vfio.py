"""The VFIO backend: real devices through the kernel's VFIO migration v2 uAPI.

What it drives
--------------

A device that a VFIO driver owns: a mediated device (mdev, named by its
UUID), a PCI function bound to ``vfio-pci`` or a vendor variant of it (a VF,
named by its address), or any device named by its sysfs path.  A plan's
``source`` and ``destination`` tables say which, in exactly one of ``mdev``,
``pci`` or ``sysfs``; :func:`locate` finds it under ``/sys`` and the plan is
refused up front, with the field's path, when it is not there.  Or the plan
names, with ``handle = "<vm>/<device>"``, a device a VMM handed over to the
daemon (``orchestrator.backends.handles``): the VMM holds it, its group and
its container, and the backend works on a duplicate of its descriptor.

The device is opened one of two ways, as the kernel offers:

* its IOMMU group and a type1v2 container: ``/dev/vfio/vfio``
  (``VFIO_GET_API_VERSION``, ``VFIO_CHECK_EXTENSION(TYPE1v2)``), the group
  ``/dev/vfio/<N>`` (``VFIO_GROUP_GET_STATUS`` viable,
  ``VFIO_GROUP_SET_CONTAINER``), ``VFIO_SET_IOMMU``, then
  ``VFIO_GROUP_GET_DEVICE_FD`` with the device's name.  A group is opened
  once per process and shared by the devices in it (the kernel lets a group
  be opened only once); another process holding it gets EBUSY, which is how
  two migrations of one device are kept apart across processes.
* its VFIO cdev ``/dev/vfio/devices/vfioN`` with iommufd:
  ``VFIO_DEVICE_BIND_IOMMUFD`` to ``/dev/iommu``, ``IOMMU_IOAS_ALLOC``,
  ``VFIO_DEVICE_ATTACH_IOMMUFD_PT``.  ``iommufd = "auto"`` (the default)
  takes it when the kernel offers the cdev, ``"never"`` never does,
  ``"require"`` refuses a device without it.

or it is handed over already open: by handle from the daemon's registry,
or by a caller holding it (:meth:`VfioDevice.from_fd`).  Either way the
backend duplicates the descriptor and owns only its duplicate.

Migration follows ``include/uapi/linux/vfio.h``: capabilities from
``VFIO_DEVICE_FEATURE_MIGRATION`` (and probes of ``MIG_DATA_SIZE`` and
``DMA_LOGGING_START``; a device with PRE_COPY opts in to the second version
of the pre-copy information where a probe finds it, so that it may report
new initial data mid pre-copy), state changes with ``MIG_DEVICE_STATE`` (one arc
per call: the runner walks paths), the stream over the ``data_fd`` the
kernel returns on entering a saving or resuming state,
``VFIO_MIG_GET_PRECOPY_INFO`` on that fd, and ``VFIO_DEVICE_RESET``.

Invariants
----------

* One ``data_fd`` per stream.  Entering PRE_COPY, PRE_COPY_P2P (from
  RUNNING_P2P) or STOP_COPY (from STOP) opens a save stream, entering
  RESUMING a load stream: the kernel must return a new fd.  An arc between
  saving states (PRE_COPY <-> PRE_COPY_P2P, PRE_COPY_P2P -> STOP_COPY)
  carries the stream on; the kernel returns -1 and the fd is kept (a new fd
  there is refused: the destination could not tell two streams apart).
  Leaving the saving and resuming states closes the fd; so do a reset and
  a device found in ERROR.
* ``read`` returns ``b""`` for "nothing more now": in a PRE_COPY state when
  the fd is not readable within 10 ms, or ``read()`` gives -ENOMSG (the
  uAPI's temporary end of pre-copy data) or 0 (what mtty gives there); in
  STOP_COPY when ``read()`` gives 0, the end of the stream.  -ENOMSG in
  STOP_COPY is a protocol error.
* A failed arc re-reads the state, so the error says whether the device
  stayed where it was or fell into ERROR, and the data_fd follows it.
* Every errno becomes a :class:`DeviceError` naming the ioctl (for
  example ``VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)``), the device (the plan's
  name, and in the message its host identity, such as ``mdev <uuid>``) and
  the state asked for.
* ``state_digest`` is the sha256 of the latest migration stream: the bytes
  read from a source, or written into a destination.  Hardware has no
  digest of its internal state; the stream's digest is the most that can be
  checked, and equal digests on both ends prove that the destination
  loaded exactly what the source saved.  None until a stream has begun.

Threads and cancellation
------------------------

Every call that can block runs in a worker thread, abandoned on
cancellation, and no descriptor is closed under a thread that may still
use it: the core the real backends share, in ``threaded.py``.  Here:

* every descriptor the device gives up (a data_fd at the end of a stream,
  all of them at ``close``) is *retired* and closed only when no worker of
  that device is running; the last one out closes them;
* a waiting ``poll`` loop (a read or write waiting for the data_fd) wakes
  every 100 ms and gives up once its caller was cancelled or the device
  closed; a blocked ioctl simply finishes late, and its thread then only
  updates this object's bookkeeping (a data_fd it brings back after its
  device was closed is retired at once).

A device whose ioctl never returns therefore keeps its descriptors, and
with them its group, until the kernel lets go: that is the truth about it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import select
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import trio
from pydantic import BaseModel

from orchestrator.backends import vfio_uapi as uapi
from orchestrator.backends.base import Backend, PrecopyInfo, StreamChunk
from orchestrator.backends.handles import handle_key, open_handle
from orchestrator.backends.threaded import ThreadedDevice
from orchestrator.backends.vfio_identity import (
    CONFIG_BYTES,
    IDENTITY_FIELDS,
    config_fields,
    sysfs_fields,
    traced_sysfs,
    vfio_identity,
)
from orchestrator.backends.vfio_locate import (
    DeviceLocation,
    LocateError,
    VfioParams,
    _model_of,
    locate,
)
from orchestrator.compat import Identity
from orchestrator.errors import DeviceError, Problem
from orchestrator.handover import HandleRegistry
from orchestrator.states import SAVING_STATES, Capabilities, DeviceState, MigrationFlags, Side

__all__ = [
    "DEFAULT_STOP_COPY_ESTIMATE",
    "DeviceLocation",
    "LocateError",
    "Syscalls",
    "VfioBackend",
    "VfioDevice",
    "VfioParams",
    "_model_of",
    "locate",
]

MIB = 1 << 20

#: What ``stop_copy_size`` answers for a device without ``MIG_DATA_SIZE`` (kernels
#: before 6.2): QEMU's default estimate, so the pre-copy decision stays cautious.
DEFAULT_STOP_COPY_ESTIMATE = 100 * MIB

#: States with an open data_fd: the saving states and RESUMING.
STREAM_STATES = SAVING_STATES | {DeviceState.RESUMING}
_PRE_COPY_STATES = frozenset({DeviceState.PRE_COPY, DeviceState.PRE_COPY_P2P})
#: How long a read in a PRE_COPY state waits for the data_fd to become readable.
_PRECOPY_POLL_MS = 10
#: The slice a waiting poll sleeps before checking for cancellation.
_POLL_SLICE_MS = 100

_MIGRATION_FLAGS_KNOWN = int(
    MigrationFlags.STOP_COPY | MigrationFlags.P2P | MigrationFlags.PRE_COPY
)


# --- system calls ------------------------------------------------------------------------


class Syscalls:
    """The system calls the backend makes; a test may substitute a fake kernel."""

    def open(self, path: Path, flags: int) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def dup(self, fd: int) -> int:
        return os.dup(fd)

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        """One ioctl; a bytearray is passed by pointer and updated in place."""
        if isinstance(arg, bytearray):
            return int(fcntl.ioctl(fd, request, arg, True))
        return int(fcntl.ioctl(fd, request, arg))

    def readinto(self, fd: int, buffer: memoryview) -> int:
        """``read(2)`` into the caller's buffer."""
        return os.readv(fd, [buffer])

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """``pread(2)``: a region of the device, such as its config space."""
        return os.pread(fd, size, offset)

    def fd_path(self, fd: int) -> str:
        """What a descriptor opens, as ``/proc/self/fd`` links it (a cdev's path)."""
        return os.readlink(f"/proc/self/fd/{fd}")

    def fd_info(self, fd: int) -> str:
        """The descriptor's ``/proc/self/fdinfo`` text."""
        return Path(f"/proc/self/fdinfo/{fd}").read_text()

    def poll(self, fd: int, events: int, timeout_ms: int) -> bool:
        """Whether ``fd`` has any of ``events`` (or an error) within the timeout."""
        poller = select.poll()
        poller.register(fd, events)
        return bool(poller.poll(timeout_ms))


REAL_SYSCALLS = Syscalls()


# --- groups and containers ------------------------------------------------------------------


@dataclass
class _Group:
    """An IOMMU group opened in this process, with its own type1v2 container."""

    key: tuple[str, int]
    container_fd: int
    group_fd: int
    syscalls: Syscalls
    users: int = 0


class _Registry:
    """The groups this process holds, and the devices it has open.

    A group can be opened only once in the kernel, so the devices of one
    group share it; and a device opened twice in one process (two
    migrations racing in a daemon) is refused here with EBUSY, as another
    process would be refused by the group.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[tuple[str, int], _Group] = {}
        self._devices: set[str] = set()
        #: One lock per group, held while it is opened or closed: a group whose
        #: open is slow holds up only the devices of that group.
        self._group_locks: dict[tuple[str, int], threading.Lock] = {}

    def claim(self, key: str) -> bool:
        with self._lock:
            if key in self._devices:
                return False
            self._devices.add(key)
            return True

    def unclaim(self, key: str) -> None:
        with self._lock:
            self._devices.discard(key)

    def _group_lock(self, key: tuple[str, int]) -> threading.Lock:
        with self._lock:
            return self._group_locks.setdefault(key, threading.Lock())

    def acquire(self, dev_root: Path, number: int, opener: Callable[[], _Group]) -> _Group:
        key = (str(dev_root), number)
        with self._group_lock(key):
            with self._lock:
                group = self._groups.get(key)
                if group is not None:
                    group.users += 1
                    return group
            group = opener()  # outside the registry's lock: it may block in the kernel
            with self._lock:
                group.users += 1
                self._groups[key] = group
                return group

    def release(self, group: _Group) -> None:
        with self._group_lock(group.key):
            with self._lock:
                group.users -= 1
                if group.users > 0:
                    return
                self._groups.pop(group.key, None)
            # Closing the group fd detaches it from its container; then the container
            # goes.  Under the group's lock: an open of it waits until it is closed.
            for fd in (group.group_fd, group.container_fd):
                with contextlib.suppress(OSError):
                    group.syscalls.close(fd)


_REGISTRY = _Registry()


# --- the device ----------------------------------------------------------------------------


@dataclass
class _Stream:
    """One migration stream of this endpoint: its fd and the digest of its bytes."""

    fd: int
    digest: Any = field(default_factory=hashlib.sha256)
    nbytes: int = 0
    ended: bool = False


class VfioDevice(ThreadedDevice):
    """One VFIO device endpoint.  See the module docstring for the rules it keeps."""

    backend: ClassVar[str] = "vfio"

    def __init__(
        self,
        name: str,
        side: Side,
        params: VfioParams | None,
        *,
        sysfs_root: Path = Path("/sys"),
        dev_root: Path = Path("/dev"),
        syscalls: Syscalls = REAL_SYSCALLS,
        handed_fd: int | None = None,
        identity: str | None = None,
        handles: HandleRegistry | None = None,
    ) -> None:
        super().__init__(name, side)
        if (params is None) == (handed_fd is None):
            raise ValueError("a VFIO device is named by its parameters or handed in as an fd")
        self.params = params
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self.syscalls = syscalls
        #: Where a device named by handle is opened from (the daemon's registry).
        self.handles = handles
        #: How messages name the device on this host.
        self.identity = identity or (
            params.address if params is not None else f"device fd {handed_fd}"
        )
        #: The device's host-wide identity (its sysfs directory) once opened by address.
        self.host_key: str | None = None
        #: How it was opened: "group", "iommufd", "handle" or "fd".
        self.opened_by: str | None = None
        self.capabilities: Capabilities | None = None

        self._retired: list[int] = []
        self._opened = False
        self._device_fd = -1 if handed_fd is None else handed_fd
        self._iommufd = -1
        self._group: _Group | None = None
        self._claimed: str | None = None
        #: Its model for the arc history, once opened by address (see _model_of).
        self._model: str | None = None
        #: Its sysfs directory, once opened by address.
        self._sysfs: Path | None = None
        self._state: DeviceState | None = None
        self._stream: _Stream | None = None
        self._last_digest: str | None = None

    @classmethod
    def from_fd(
        cls,
        name: str,
        side: Side,
        fd: int,
        *,
        identity: str | None = None,
        syscalls: Syscalls = REAL_SYSCALLS,
    ) -> VfioDevice:
        """A device already open elsewhere (a VMM hands its descriptor over).

        The descriptor is duplicated at once: the caller keeps and closes its
        own; this object owns and closes only the duplicate.  Group,
        container and iommufd stay with whoever opened them.
        """
        try:
            own = syscalls.dup(fd)
        except OSError as exc:
            raise DeviceError(
                f"{identity or f'device fd {fd}'}: cannot duplicate the descriptor: "
                f"{os.strerror(exc.errno or errno.EBADF)}",
                device=name,
                operation="dup",
                errno=exc.errno,
            ) from None
        return cls(
            name,
            side,
            None,
            syscalls=syscalls,
            handed_fd=own,
            identity=identity or f"device fd {fd}",
        )

    # -- the Device interface --

    def model_key(self) -> str | None:
        return self._model

    async def open(self) -> Capabilities:
        handle = self.params.handle if self.params is not None else None
        if handle is not None:
            # The registry is single-threaded trio code: the duplicate is taken
            # here, in the trio thread, and is this device's from now on.
            with self._lock:
                fresh = not (self._opened or self._closed) and self._device_fd < 0
            if fresh:
                fd = open_handle(self.handles, handle, kind=self.backend, device=self.name)
                with self._lock:
                    self._device_fd = fd
        return await self._in_thread("open", self._open_blocking)

    async def device_identity(self) -> Identity:
        """PCI IDs, mdev type, driver and its version, migration flags
        (``orchestrator.backends.vfio_identity``)."""
        return await self._in_thread("identity", self._identity_blocking)

    async def get_state(self) -> DeviceState:
        return await self._in_thread(
            "VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)", lambda _: self._read_state()
        )

    async def set_state(self, target: DeviceState) -> None:
        await self._in_thread(
            "VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)", lambda _: self._set_state_blocking(target)
        )

    async def read(self, max_bytes: int) -> bytes:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        stream, state = self._save_stream()
        if stream.ended:
            return b""
        buffer = bytearray(max_bytes)
        n = await self._in_thread(
            "read(data_fd)",
            lambda cancel: self._read_blocking(cancel, stream, state, memoryview(buffer)),
        )
        del buffer[n:]
        data = bytes(buffer)
        self._count(stream, data)
        return data

    async def write(self, data: StreamChunk) -> None:
        stream = self._load_stream()
        if not data:
            await trio.lowlevel.checkpoint()
            return
        await self._in_thread(
            "write(data_fd)", lambda cancel: self._write_blocking(cancel, stream, data)
        )
        self._count(stream, data)

    def bulk_reader(self) -> _DataFd:
        return _DataFd(self)

    def bulk_writer(self) -> _DataFd:
        return _DataFd(self)

    def _save_stream(self) -> tuple[_Stream, DeviceState]:
        """The stream ``read`` reads, in the state it is read in; EINVAL if none."""
        self._check_open("read(data_fd)")
        stream, state = self._stream, self._state
        if stream is None or state not in SAVING_STATES:
            raise self._error(
                "read(data_fd)",
                errno.EINVAL,
                f"there is no save stream to read in {_name(state)}",
            )
        return stream, state

    def _load_stream(self) -> _Stream:
        """The stream ``write`` loads; EINVAL outside RESUMING."""
        self._check_open("write(data_fd)")
        stream, state = self._stream, self._state
        if stream is None or state is not DeviceState.RESUMING:
            raise self._error(
                "write(data_fd)",
                errno.EINVAL,
                f"the device loads only in RESUMING, not {_name(state)}",
            )
        return stream

    @staticmethod
    def _count(stream: _Stream, data: StreamChunk) -> None:
        if data:
            stream.digest.update(data)
            stream.nbytes += len(data)

    async def precopy_info(self) -> PrecopyInfo:
        operation = "VFIO_MIG_GET_PRECOPY_INFO"
        self._check_open(operation)
        stream, state = self._stream, self._state
        if stream is None or state not in _PRE_COPY_STATES:
            raise self._error(
                operation,
                errno.EINVAL,
                f"precopy info exists only in PRE_COPY states, not {_name(state)}",
            )

        # The flags are an output only once the device opted in (v2); before,
        # the kernel may hand back whatever was passed in.
        opted_in = self.capabilities is not None and self.capabilities.precopy_reinit

        def query(_: threading.Event) -> PrecopyInfo:
            buf = uapi.precopy_info_request()
            self._ioctl(stream.fd, uapi.VFIO_MIG_GET_PRECOPY_INFO, buf, operation)
            initial, dirty, flags = uapi.precopy_info_result(buf)
            reinit = opted_in and bool(flags & uapi.PRECOPY_INFO_REINIT)
            return PrecopyInfo(initial_bytes=initial, dirty_bytes=dirty, reinit=reinit)

        return await self._in_thread(operation, query)

    async def stop_copy_size(self) -> int:
        operation = "VFIO_DEVICE_FEATURE(MIG_DATA_SIZE)"
        caps = self.capabilities
        if caps is not None and not caps.stop_copy_size:
            await trio.lowlevel.checkpoint()
            return DEFAULT_STOP_COPY_ESTIMATE

        def query(_: threading.Event) -> int:
            buf = uapi.feature_request(
                uapi.Feature.MIG_DATA_SIZE, uapi.FeatureOp.GET, uapi.FEATURE_MIG_DATA_SIZE.size
            )
            self._ioctl(self._device_fd, uapi.VFIO_DEVICE_FEATURE, buf, operation)
            (size,) = uapi.FEATURE_MIG_DATA_SIZE.unpack_from(buf, uapi.FEATURE_HEADER.size)
            return int(size)

        return await self._in_thread(operation, query)

    async def reset(self) -> None:
        await self._in_thread("VFIO_DEVICE_RESET", self._reset_blocking)

    async def state_digest(self) -> str | None:
        """The sha256 of the latest migration stream (see the module docstring)."""
        await trio.lowlevel.checkpoint()
        stream = self._stream
        if stream is not None:
            return str(stream.digest.hexdigest())
        return self._last_digest

    # -- releasing (threaded.ThreadedDevice) --

    def _closing_locked(self) -> None:
        self._finish_stream_locked()

    def _collect_locked(self) -> Callable[[], None] | None:
        retired, self._retired = self._retired, []
        group = claimed = None
        if self._closed:
            retired += [fd for fd in (self._device_fd, self._iommufd) if fd >= 0]
            self._device_fd = self._iommufd = -1
            group, self._group = self._group, None
            claimed, self._claimed = self._claimed, None
        if not retired and group is None and claimed is None:
            return None

        def release() -> None:
            for fd in retired:
                with contextlib.suppress(OSError):
                    self.syscalls.close(fd)
            if group is not None:
                _REGISTRY.release(group)
            if claimed is not None:
                _REGISTRY.unclaim(claimed)

        return release

    def _finish_stream_locked(self) -> None:
        stream = self._stream
        if stream is not None:
            self._stream = None
            self._last_digest = stream.digest.hexdigest()
            self._retired.append(stream.fd)

    # -- blocking work (in worker threads) --

    def _open_blocking(self, _: threading.Event) -> Capabilities:
        if self._opened:
            raise self._error("open", errno.EBUSY, "the device is already open")
        self._opened = True
        try:
            if self._device_fd < 0:
                self._open_by_address()
            else:
                handed = self.params is not None and self.params.handle is not None
                self.opened_by = "handle" if handed else "fd"
            caps = self._query_capabilities()
            self._state = self._read_state()
        except BaseException:
            self._give_up()
            raise
        self.capabilities = caps
        return caps

    def _give_up(self) -> None:
        """An open that failed half-way lets go of what it took."""
        with self._lock:
            for fd in (self._device_fd, self._iommufd):
                if fd >= 0:
                    self._retired.append(fd)
            self._device_fd = self._iommufd = -1
            group, self._group = self._group, None
            claimed, self._claimed = self._claimed, None
        if group is not None:
            _REGISTRY.release(group)
        if claimed is not None:
            _REGISTRY.unclaim(claimed)

    def _open_by_address(self) -> None:
        assert self.params is not None
        try:
            location = locate(self.params, self.sysfs_root)
        except LocateError as exc:
            raise self._error("open", errno.ENODEV, exc.message) from None
        self.identity = location.identity
        self._model = _model_of(location.sysfs)
        self._sysfs = location.sysfs
        key = str(location.sysfs)
        if not _REGISTRY.claim(key):
            raise self._error(
                "open",
                errno.EBUSY,
                "the device is already open in this process (is another migration using it?)",
            )
        self._claimed = self.host_key = key
        cdev_path = self.dev_root / "vfio" / "devices" / location.cdev if location.cdev else None
        iommu_path = self.dev_root / "iommu"
        have_cdev = cdev_path is not None and cdev_path.exists() and iommu_path.exists()
        choice = self.params.iommufd
        if choice == "require" and not have_cdev:
            raise self._error(
                "open",
                errno.ENODEV,
                "iommufd = 'require', but the kernel offers no VFIO cdev and /dev/iommu for it "
                "(CONFIG_VFIO_DEVICE_CDEV and CONFIG_IOMMUFD)",
            )
        if have_cdev and choice != "never":
            assert cdev_path is not None
            self._open_cdev(cdev_path, iommu_path)
            self.opened_by = "iommufd"
            return
        if location.group is None:
            raise self._error(
                "open", errno.ENODEV, "the device has no IOMMU group to open it through"
            )
        number = location.group
        group = _REGISTRY.acquire(self.dev_root, number, lambda: self._open_group(number))
        self._group = group
        name = bytearray(location.name.encode() + b"\0")
        self._device_fd = self._ioctl(
            group.group_fd, uapi.VFIO_GROUP_GET_DEVICE_FD, name, "VFIO_GROUP_GET_DEVICE_FD"
        )
        self.opened_by = "group"

    def _open_group(self, number: int) -> _Group:
        container = self._open_node(self.dev_root / "vfio" / "vfio")
        try:
            self._check_container(container)
            group_fd = self._open_node(self.dev_root / "vfio" / str(number), group=number)
        except BaseException:
            self._close_quietly(container)
            raise
        try:
            self._attach_group(group_fd, container, number)
        except BaseException:
            self._close_quietly(group_fd)
            self._close_quietly(container)
            raise
        return _Group(
            key=(str(self.dev_root), number),
            container_fd=container,
            group_fd=group_fd,
            syscalls=self.syscalls,
        )

    def _check_container(self, container: int) -> None:
        version = self._ioctl(container, uapi.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
        if version != uapi.VFIO_API_VERSION:
            raise self._error(
                "VFIO_GET_API_VERSION",
                errno.EINVAL,
                f"the kernel speaks VFIO API {version}, this backend {uapi.VFIO_API_VERSION}",
            )
        operation = "VFIO_CHECK_EXTENSION(TYPE1v2)"
        type1v2 = self._ioctl(
            container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU, operation
        )
        if type1v2 != 1:
            raise self._error(
                operation, errno.ENODEV, "the kernel has no type1v2 IOMMU (load vfio_iommu_type1)"
            )

    def _attach_group(self, group_fd: int, container: int, number: int) -> None:
        status = bytearray(uapi.GROUP_STATUS.pack(uapi.GROUP_STATUS.size, 0))
        self._ioctl(group_fd, uapi.VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
        _, flags = uapi.GROUP_STATUS.unpack(status)
        if not flags & uapi.VFIO_GROUP_FLAGS_VIABLE:
            raise self._error(
                "VFIO_GROUP_GET_STATUS",
                errno.EPERM,
                f"IOMMU group {number} is not viable: every device in it must be bound "
                "to a VFIO driver (or to none)",
            )
        self._ioctl(
            group_fd,
            uapi.VFIO_GROUP_SET_CONTAINER,
            bytearray(struct.pack("=i", container)),
            "VFIO_GROUP_SET_CONTAINER",
        )
        self._ioctl(
            container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, "VFIO_SET_IOMMU(TYPE1v2)"
        )

    def _open_cdev(self, cdev_path: Path, iommu_path: Path) -> None:
        # Each fd goes into self as soon as it exists, so a failure releases it.
        self._device_fd = self._open_node(cdev_path)
        self._iommufd = self._open_node(iommu_path)
        bind = bytearray(uapi.BIND_IOMMUFD.pack(uapi.BIND_IOMMUFD.size, 0, self._iommufd, 0))
        self._ioctl(
            self._device_fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind, "VFIO_DEVICE_BIND_IOMMUFD"
        )
        alloc = bytearray(uapi.IOAS_ALLOC.pack(uapi.IOAS_ALLOC.size, 0, 0))
        self._ioctl(self._iommufd, uapi.IOMMU_IOAS_ALLOC, alloc, "IOMMU_IOAS_ALLOC")
        ioas = uapi.IOAS_ALLOC.unpack(alloc)[2]
        attach = bytearray(uapi.ATTACH_IOMMUFD_PT.pack(uapi.ATTACH_IOMMUFD_PT.size, 0, ioas))
        self._ioctl(
            self._device_fd,
            uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            attach,
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        )

    def _open_node(self, path: Path, *, group: int | None = None) -> int:
        try:
            return self.syscalls.open(path, os.O_RDWR)
        except OSError as exc:
            err = exc.errno or errno.EIO
            hint = ""
            if err == errno.EBUSY and group is not None:
                hint = (
                    f"IOMMU group {group} is in use by another process (a VMM, or another "
                    "migration of this device)"
                )
            elif err in (errno.EACCES, errno.EPERM):
                hint = f"needs root, or read-write access to {path}"
            elif err == errno.ENOENT:
                hint = f"{path} does not exist (is the vfio module loaded?)"
            raise self._error(f"open({path})", err, hint) from None

    def _identity_blocking(self, _: threading.Event) -> Identity:
        fd = self._fd("identity")
        sysfs = self._sysfs
        if sysfs is None:  # handed over: traced back to its device where it can be
            with contextlib.suppress(OSError):
                info = self.syscalls.fd_info(fd)
                sysfs = traced_sysfs(self.syscalls.fd_path(fd), info, self.sysfs_root)
        fields = sysfs_fields(sysfs, self.sysfs_root) if sysfs is not None else {}
        if "vendor" not in fields:  # an mdev, or a group's descriptor: its config space
            fields.update(config_fields(self._config_header(fd)))
        return vfio_identity(fields, self.capabilities)

    def _config_header(self, fd: int) -> bytes:
        """The first bytes of the device's PCI config space (none: no config region)."""
        buf = uapi.region_info_request(uapi.VFIO_PCI_CONFIG_REGION_INDEX)
        try:
            self.syscalls.ioctl(fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf)
            region = uapi.region_info_result(buf)
            if not region.readable or region.size < CONFIG_BYTES:
                return b""
            return self.syscalls.pread(fd, CONFIG_BYTES, region.offset)
        except OSError:
            return b""  # not a PCI device: its sysfs is all there is

    def _query_capabilities(self) -> Capabilities:
        operation = "VFIO_DEVICE_FEATURE(MIGRATION)"
        buf = uapi.feature_request(
            uapi.Feature.MIGRATION, uapi.FeatureOp.GET, uapi.FEATURE_MIGRATION.size
        )
        try:
            self.syscalls.ioctl(self._device_fd, uapi.VFIO_DEVICE_FEATURE, buf)
        except OSError as exc:
            err = exc.errno or errno.EIO
            hint = "the device's driver does not support migration" if err == errno.ENOTTY else ""
            raise self._error(operation, err, hint) from None
        (raw,) = uapi.FEATURE_MIGRATION.unpack_from(buf, uapi.FEATURE_HEADER.size)
        flags = MigrationFlags(int(raw) & _MIGRATION_FLAGS_KNOWN)
        if MigrationFlags.STOP_COPY not in flags:
            raise self._error(
                operation,
                errno.EPROTO,
                f"migration flags {int(raw):#x} lack STOP_COPY, which the uAPI makes mandatory",
            )
        return Capabilities(
            flags=flags,
            stop_copy_size=self._probe(uapi.Feature.MIG_DATA_SIZE, uapi.FeatureOp.GET),
            dirty_logging=self._probe(uapi.Feature.DMA_LOGGING_START, uapi.FeatureOp.SET),
            precopy_reinit=MigrationFlags.PRE_COPY in flags and self._opt_in_precopy_v2(),
        )

    def _opt_in_precopy_v2(self) -> bool:
        """Opt in to the second version of the pre-copy information, where the
        kernel has it: the device may then report new initial data mid pre-copy.
        Without it (an older kernel, a driver that does not implement it) the
        device keeps today's behaviour, and its capabilities say so."""
        feature, op = uapi.Feature.MIG_PRECOPY_INFO_V2, uapi.FeatureOp.SET
        return self._probe(feature, op) and self._feature_call(feature, op, "SET")

    def _probe(self, feature: uapi.Feature, op: uapi.FeatureOp) -> bool:
        """Whether the device supports ``op`` on ``feature`` (the PROBE flag)."""
        return self._feature_call(feature, uapi.FeatureOp.PROBE | op, "PROBE")

    def _feature_call(self, feature: uapi.Feature, op: uapi.FeatureOp, what: str) -> bool:
        """A ``VFIO_DEVICE_FEATURE`` call without data; False where the kernel or
        the driver lacks the feature, a device error for any other failure."""
        buf = uapi.feature_request(feature, op)
        try:
            self.syscalls.ioctl(self._device_fd, uapi.VFIO_DEVICE_FEATURE, buf)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return False
            raise self._error(
                f"VFIO_DEVICE_FEATURE({what} {feature.name})", exc.errno or errno.EIO
            ) from None
        return True

    def _read_state(self) -> DeviceState:
        buf = uapi.mig_state_request(uapi.FeatureOp.GET)
        self._ioctl(
            self._device_fd, uapi.VFIO_DEVICE_FEATURE, buf, "VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)"
        )
        raw, _ = uapi.mig_state_result(buf)
        try:
            state = DeviceState(raw)
        except ValueError:
            raise self._error(
                "VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)",
                errno.EPROTO,
                f"the device reports migration state {raw}, which the uAPI does not define",
            ) from None
        self._state = state
        if state not in STREAM_STATES:
            with self._lock:
                self._finish_stream_locked()
        return state

    def _set_state_blocking(self, target: DeviceState) -> None:
        operation = "VFIO_DEVICE_FEATURE(MIG_DEVICE_STATE)"
        before = self._state
        buf = uapi.mig_state_request(uapi.FeatureOp.SET, int(target))
        fd = self._fd(operation, target)
        try:
            self.syscalls.ioctl(fd, uapi.VFIO_DEVICE_FEATURE, buf)
        except OSError as exc:
            err = exc.errno or errno.EIO
            try:
                now = f"the device reads {self._read_state().name} now"
            except DeviceError as again:
                now = f"its state could not be read back: {again.message}"
            raise self._error(
                operation, err, f"{_name(before)} -> {target.name} refused; {now}", target
            ) from None
        _, data_fd = uapi.mig_state_result(buf)
        opens = target in STREAM_STATES and (
            target is DeviceState.RESUMING or before not in SAVING_STATES
        )
        problem = None
        with self._lock:
            self._state = target
            if self._closed:
                # Abandoned and overtaken by close: nobody will read this stream.
                if data_fd >= 0:
                    self._retired.append(data_fd)
            elif opens:
                self._finish_stream_locked()
                if data_fd >= 0:
                    self._stream = _Stream(data_fd)
                else:
                    problem = f"entering {target.name} returned no data_fd"
            elif target in STREAM_STATES:
                if data_fd >= 0:
                    self._retired.append(data_fd)
                    problem = (
                        f"{_name(before)} -> {target.name} returned a new data_fd while the "
                        "stream was open; one stream cannot continue in another"
                    )
            else:
                self._finish_stream_locked()
                if data_fd >= 0:
                    self._retired.append(data_fd)
        if problem is not None:
            raise self._error(operation, errno.EPROTO, problem, target)

    def _read_blocking(
        self, cancel: threading.Event, stream: _Stream, state: DeviceState, buffer: memoryview
    ) -> int:
        operation = "read(data_fd)"
        precopy = state in _PRE_COPY_STATES
        if precopy:
            if not self._poll(stream.fd, select.POLLIN, _PRECOPY_POLL_MS, operation):
                return 0
        else:
            self._wait(cancel, stream.fd, select.POLLIN, operation)
        try:
            n = self.syscalls.readinto(stream.fd, buffer)
        except OSError as exc:
            err = exc.errno or errno.EIO
            if err == errno.ENOMSG and precopy:
                return 0  # the uAPI's temporary end of pre-copy data
            hint = f"at stream offset {stream.nbytes} in {state.name}"
            if err == errno.ENOMSG:
                hint += (
                    " (ENOMSG is the temporary end of pre-copy data; STOP_COPY must not give it)"
                )
            raise self._error(operation, err, hint) from None
        if not n and not precopy:
            stream.ended = True
        return n

    def _write_blocking(self, cancel: threading.Event, stream: _Stream, data: StreamChunk) -> None:
        operation = "write(data_fd)"
        view = memoryview(data)
        done = 0
        while done < len(view):
            self._wait(cancel, stream.fd, select.POLLOUT, operation)
            try:
                written = self.syscalls.write(stream.fd, view[done:])
            except OSError as exc:
                raise self._error(
                    operation,
                    exc.errno or errno.EIO,
                    f"the device refused the stream at offset {stream.nbytes + done} "
                    f"({done} of {len(view)} bytes of this write taken)",
                ) from None
            if written <= 0:
                raise self._error(
                    operation,
                    errno.EIO,
                    f"the device took no bytes at stream offset {stream.nbytes + done}",
                )
            done += written

    def _reset_blocking(self, _: threading.Event) -> None:
        self._ioctl(self._device_fd, uapi.VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET")
        with self._lock:
            self._finish_stream_locked()
        state = self._read_state()
        if state is not DeviceState.RUNNING:
            raise self._error(
                "VFIO_DEVICE_RESET",
                errno.EIO,
                f"after the reset the device reads {state.name}, not RUNNING",
            )

    def _wait(self, cancel: threading.Event, fd: int, events: int, operation: str) -> None:
        """Poll in slices until ``fd`` is ready, the caller gave up, or the device closed."""
        while not self._poll(fd, events, _POLL_SLICE_MS, operation):
            if cancel.is_set() or self._closed:
                raise self._error(operation, errno.ECANCELED, "given up while waiting")

    def _poll(self, fd: int, events: int, timeout_ms: int, operation: str) -> bool:
        try:
            return self.syscalls.poll(fd, events, timeout_ms)
        except OSError as exc:
            raise self._error(f"poll before {operation}", exc.errno or errno.EIO) from None

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise self._error(operation, errno.EBADF, "the device is closed")

    def _fd(self, operation: str, target: DeviceState | None = None) -> int:
        """The device's descriptor; EBADF if it is not open (never opened, or an open failed)."""
        fd = self._device_fd
        if fd < 0:
            raise self._error(operation, errno.EBADF, "the device is not open", target)
        return fd

    def _ioctl(self, fd: int, request: int, arg: int | bytearray, operation: str) -> int:
        if fd < 0:
            raise self._error(operation, errno.EBADF, "the device is not open")
        try:
            return self.syscalls.ioctl(fd, request, arg)
        except OSError as exc:
            raise self._error(operation, exc.errno or errno.EIO) from None

    def _close_quietly(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            self.syscalls.close(fd)


def _name(state: DeviceState | None) -> str:
    return "an unknown state" if state is None else state.name


# --- the backend ---------------------------------------------------------------------------


def _params(params: BaseModel) -> VfioParams:
    if not isinstance(params, VfioParams):
        raise TypeError(f"expected VfioParams, got {type(params).__name__}")
    return params


class VfioBackend(Backend):
    """``backend = "vfio"``: devices a VFIO driver owns, on this host."""

    name: ClassVar[str] = "vfio"
    params_model: ClassVar[type[BaseModel]] = VfioParams
    identity_fields: ClassVar[tuple[str, ...]] = IDENTITY_FIELDS

    def present(self) -> bool:
        return os.path.isdir("/dev/vfio")

    def __init__(
        self,
        sysfs_root: Path = Path("/sys"),
        dev_root: Path = Path("/dev"),
        syscalls: Syscalls = REAL_SYSCALLS,
        handles: HandleRegistry | None = None,
    ) -> None:
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self.syscalls = syscalls
        #: The daemon's handed-over devices; None outside the daemon (no handles then).
        self.handles = handles

    def __repr__(self) -> str:
        return f"<VfioBackend sysfs={self.sysfs_root} dev={self.dev_root}>"

    def with_handles(self, handles: HandleRegistry) -> VfioBackend:
        return VfioBackend(self.sysfs_root, self.dev_root, self.syscalls, handles)

    def destination_defaults(self, source: BaseModel) -> Mapping[str, Any]:
        # The address is per host and never inherited; the way to open it is.
        return {"iommufd": _params(source).iommufd}

    def check_pair(self, source: BaseModel, destination: BaseModel) -> list[Problem]:
        problems: list[Problem] = []
        found: dict[str, DeviceLocation] = {}
        for where, params in (("source", _params(source)), ("destination", _params(destination))):
            if params.handle is not None:
                continue  # the daemon's registry vouches for it (resolve checks it there)
            try:
                location = locate(params, self.sysfs_root)
            except LocateError as exc:
                problems.append(Problem(f"{where}.{exc.field}", exc.message))
                continue
            found[where] = location
            if params.iommufd == "require" and location.cdev is None:
                problems.append(
                    Problem(
                        f"{where}.iommufd",
                        f"'require', but the kernel made no VFIO cdev for {location.identity} "
                        "(CONFIG_VFIO_DEVICE_CDEV and CONFIG_IOMMUFD)",
                    )
                )
        if len(found) == 2 and found["source"].sysfs == found["destination"].sysfs:
            field_name = _params(destination).address_field
            problems.append(
                Problem(
                    f"destination.{field_name}",
                    f"the destination is the source device itself ({found['source'].identity})",
                )
            )
        handle = _params(source).handle
        if handle is not None and handle == _params(destination).handle:
            problems.append(
                Problem(
                    "destination.handle",
                    f"the destination is the source device itself (handle {handle!r})",
                )
            )
        return problems

    def device_keys(self, name: str, source: BaseModel, destination: BaseModel) -> list[str]:
        """Each endpoint's host-wide identity: its sysfs directory, symlinks resolved
        (an mdev, a PCI address and a sysfs path naming one device give one key), or
        its handle.  A device that cannot be found (it vanished since the plan was
        checked) is keyed by its address as the plan gives it."""
        keys = []
        for params in (_params(source), _params(destination)):
            if params.handle is not None:
                keys.append(handle_key(self.name, params.handle))
                continue
            try:
                keys.append(f"{self.name}:{locate(params, self.sysfs_root).sysfs}")
            except LocateError:
                keys.append(f"{self.name}:{params.address}")
        return keys

    def create(self, name: str, side: Side, params: BaseModel) -> VfioDevice:
        return VfioDevice(
            name,
            side,
            _params(params),
            sysfs_root=self.sysfs_root,
            dev_root=self.dev_root,
            syscalls=self.syscalls,
            handles=self.handles,
        )

    def adopt_fd(
        self, name: str, side: Side, fd: int, *, identity: str | None = None
    ) -> VfioDevice:
        """A device whose open descriptor a VMM handed over (see :meth:`VfioDevice.from_fd`)."""
        return VfioDevice.from_fd(name, side, fd, identity=identity, syscalls=self.syscalls)


class _DataFd:
    """The blocking side of a VFIO device's ``data_fd``, for a data channel's I/O thread.

    Each call registers the thread as one of the device's workers (its
    descriptors outlive the call), reads into or writes from the channel's
    buffer with no copy of its own, and keeps the stream's digest and count
    as ``read`` and ``write`` do.  A thread the runner abandoned stops at
    its next wait for the descriptor (``cancel``), as a worker does.
    """

    def __init__(self, device: VfioDevice) -> None:
        self._device = device

    def read_into(self, buffer: memoryview, cancel: threading.Event) -> int:
        device = self._device
        stream, state = device._save_stream()
        if stream.ended:
            return 0
        with device._as_worker("read(data_fd)"):
            n = device._read_blocking(cancel, stream, state, buffer)
        device._count(stream, buffer[:n])
        return n

    def write_from(self, data: memoryview, cancel: threading.Event) -> None:
        device = self._device
        stream = device._load_stream()
        if data.nbytes:
            with device._as_worker("write(data_fd)"):
                device._write_blocking(cancel, stream, data)
            device._count(stream, data)
