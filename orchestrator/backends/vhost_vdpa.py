"""The vhost-vdpa backend: vDPA devices (``/dev/vhost-vdpa-N``) a VMM owns.

What it drives, and who owns what
---------------------------------

A vDPA device bound to ``vhost_vdpa`` is a character device that exactly
one process *owns* (``VHOST_SET_OWNER``): the VMM.  The VMM maps guest
memory into the device's IOTLB (vhost-vdpa pins, or binds, the pages of the
owner's address space), places the virtqueues in guest memory and starts
the device.  The kernel serves everything about virtqueues and the IOTLB to
the owner only: ``vhost_dev_check_owner`` compares the caller's ``mm`` with
the owner's, so another process holding the same descriptor gets EPERM from
``VHOST_GET_VRING_BASE``, ``VHOST_SET_VRING_BASE``,
``VHOST_VDPA_SET_VRING_ENABLE`` and the rest (measured in the kernel lab).
Suspend, resume, status, features and config space are served to any
holder of the descriptor.

So the work is split, and a plan names both halves of each endpoint:

* the device's descriptor, handed over by the VMM: ``handle = "vm/nic0"``
  (the daemon's handover socket, ``orchestrator.backends.handles``) or
  ``fd = N`` (a descriptor ``orchestrator run`` inherited from the VMM that
  started it).  Through it the backend suspends and resumes the device,
  reads and writes its status, negotiates its features and reads its
  config space;
* ``owner_socket``: the VMM's *owner channel*, a Unix SEQPACKET socket on
  which the VMM performs for the backend the three things only the owner
  may do.  One JSON request per message, one JSON reply
  (``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``):

  - ``{"op": "vrings"}`` -> ``{"features": F, "vrings": [{"index", "size",
    "base", "enabled"}, ...]}``: the features the VMM negotiated (vhost-vdpa
    has no ioctl to read them back), and for every virtqueue it set up its
    size, whether it is enabled, and its ring position as
    ``VHOST_GET_VRING_BASE`` gives it *now* (the backend asks after
    ``VHOST_VDPA_SUSPEND``);
  - ``{"op": "set_bases", "vrings": [{"index", "size", "base"}, ...]}``:
    ``VHOST_SET_VRING_BASE`` for each (the VMM checks the sizes match the
    rings it placed);
  - ``{"op": "enable", "vrings": [{"index", "enabled"}, ...]}``:
    ``VHOST_VDPA_SET_VRING_ENABLE`` for each.

  Ring addresses, sizes, kick and call eventfds and the IOTLB stay the
  VMM's, set up before the migration on both hosts, as guest memory is.

The state model, and why the mapping is honest
----------------------------------------------

vhost-vdpa has no migration state machine; the backend maps the VFIO v2
states onto what the device does, one arc per ``set_state``:

* RUNNING: not suspended; the device processes its rings as its driver
  status says (a device whose driver has not set DRIVER_OK processes
  nothing: a destination the VMM prepared but did not start reads RUNNING,
  as a fresh VFIO device does).
* RUNNING_P2P: suspended (``VHOST_VDPA_SUSPEND``).  vDPA has no separate
  no-DMA state: a suspended device processes no descriptors, so it neither
  reads nor writes guest memory, nor anything a peer device could be
  reached through.  Suspending it is how it takes part in the P2P barrier,
  so the backend reports the P2P capability.
* STOP: suspended.  STOP_COPY: suspended, and the save stream is the
  device's state record (:class:`~vhost_vdpa_uapi.DeviceRecord`), read on
  entering STOP_COPY: negotiated features, status, config space, and every
  virtqueue's size, ring position and enable state.  It is small (about 200
  bytes) and read after the device stopped, so there is no pre-copy:
  capabilities are STOP_COPY and P2P only.
* RESUMING: the destination accepts the record through ``write``.  Leaving
  it for STOP applies it in the order the uAPI requires: status
  ACKNOWLEDGE|DRIVER, ``VHOST_SET_FEATURES`` (refused by the kernel once
  FEATURES_OK is set), FEATURES_OK (and a check that the device kept it),
  a check that the config space equals the source's, then the ring
  positions through the owner channel (``VHOST_SET_VRING_BASE`` is refused
  while the device runs).
* STOP -> RUNNING_P2P on a destination that applied a record: DRIVER_OK,
  then at once SUSPEND, then the owner enables the rings the source had
  enabled.  With ``ENABLE_AFTER_DRIVER_OK`` (vdpa_sim has it) the rings are
  still disabled when DRIVER_OK is set, so the device cannot process a
  descriptor before the commit; without it the rings must be enabled first
  and the device runs between DRIVER_OK and SUSPEND (microseconds, with the
  guest's vCPUs paused).  RUNNING_P2P -> RUNNING: ``VHOST_VDPA_RESUME``.
* The kernel cannot say whether a device is suspended: the backend keeps
  that itself, and reads ERROR when the device's status has FAILED or
  NEEDS_RESET.  ``reset`` writes status 0 (a virtio reset): the device
  forgets features, rings and, without ``IOTLB_PERSIST``, its mappings, so
  its VMM must set it up again.

A device that cannot be suspended cannot be migrated live (it would go on
writing guest memory after the source stopped), and one that cannot be
resumed cannot be rolled back: both are refused before anything changes,
with the backend features read from the device.  A kick that reached the
source while it was suspended is lost with it: the destination VMM kicks
every enabled ring once when it resumes the vCPUs, as QEMU does.

Timings
-------

:meth:`VhostVdpaDevice.timings` reports, in ms, where this backend spends
the downtime: ``suspend`` (source), ``state_read`` (source: the reads and
the owner's round trip), ``restore`` (destination: features, status, config
check, bases), ``start`` (destination: DRIVER_OK, suspend, enable) and
``resume`` (destination); a rolled-back source adds ``rollback_resume``.

Threads and cancellation
------------------------

Every ioctl and owner request runs in a trio worker thread, abandoned on
cancellation; the descriptor is closed only when no worker of the device
still runs, so its number is never reused under a late ioctl (the core
shared with the VFIO backend, ``threaded.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import trio
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.backends import vhost_vdpa_uapi as uapi
from orchestrator.backends.base import Backend, PrecopyInfo, StreamChunk
from orchestrator.backends.handles import check_handle, handle_key, open_handle
from orchestrator.backends.threaded import ThreadedDevice
from orchestrator.compat import (
    CAPABILITIES_FIELD,
    FEATURES_FIELD,
    FieldValue,
    Identity,
    capability_names,
)
from orchestrator.errors import Problem
from orchestrator.handover import HandleRegistry, HandoverError, check_kind
from orchestrator.states import Capabilities, DeviceState, MigrationFlags, Side, is_arc

__all__ = [
    "CAPABILITIES",
    "OwnerChannel",
    "SocketOwner",
    "VhostVdpaBackend",
    "VhostVdpaDevice",
    "VhostVdpaParams",
    "read_backend_features",
]

T = TypeVar("T")
S = DeviceState

#: What every vhost-vdpa device that can be suspended and resumed offers.
CAPABILITIES = Capabilities(
    flags=MigrationFlags.STOP_COPY | MigrationFlags.P2P, stop_copy_size=True
)
REQUIRED_BACKEND = (uapi.BACKEND_F_SUSPEND, uapi.BACKEND_F_RESUME)
#: How long one owner-channel request may take before the backend gives up on it
#: (the runner's own deadline is usually shorter and wins).
OWNER_TIMEOUT_S = 30.0


# --- plan parameters ---------------------------------------------------------------------


class VhostVdpaParams(BaseModel):
    """One vhost-vdpa endpoint: the VMM's descriptor, and its owner channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    handle: str | None = Field(
        default=None,
        description="A device the VMM handed over to the daemon's handover socket, as "
        "'<vm>/<device>' (only through the daemon: `orchestrator serve`).",
    )
    fd: int | None = Field(
        default=None,
        ge=3,
        description="A /dev/vhost-vdpa-N descriptor this process inherited from the VMM that "
        "started it (`orchestrator run` as the VMM's child).",
    )
    owner_socket: str = Field(
        description="The VMM's owner channel for this device: a Unix SEQPACKET socket on which "
        "the VMM reads and sets ring positions and enables rings, which vhost serves to the "
        "device's owner only.",
    )

    _handle = field_validator("handle")(check_handle)

    @field_validator("owner_socket")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} is not an absolute path")
        return value

    @model_validator(mode="after")
    def _one_device(self) -> VhostVdpaParams:
        given = [name for name in ("handle", "fd") if getattr(self, name) is not None]
        if len(given) != 1:
            which = " and ".join(given) if given else "none"
            raise ValueError(f"name the device by exactly one of handle or fd (got {which})")
        return self

    @property
    def address(self) -> str:
        return f"handle {self.handle}" if self.handle is not None else f"fd {self.fd}"


def _params(params: BaseModel) -> VhostVdpaParams:
    if not isinstance(params, VhostVdpaParams):
        raise TypeError(f"expected VhostVdpaParams, got {type(params).__name__}")
    return params


def read_backend_features(fd: int) -> int:
    """``VHOST_GET_BACKEND_FEATURES`` of an open vhost-vdpa descriptor (any holder may ask)."""
    buf = bytearray(uapi.U64.size)
    fcntl.ioctl(fd, uapi.VHOST_GET_BACKEND_FEATURES, buf, True)
    return int(uapi.U64.unpack(buf)[0])


def missing_backend_features(features: int) -> list[str]:
    return [uapi.BACKEND_FEATURE_NAMES[b] for b in REQUIRED_BACKEND if not features & uapi.bit(b)]


def refusal(features: int) -> str | None:
    """Why a device with these backend features cannot migrate live, if it cannot."""
    missing = missing_backend_features(features)
    if not missing:
        return None
    why = []
    if "SUSPEND" in missing:
        why.append(
            "without SUSPEND the device cannot be stopped while the VM's memory still "
            "maps it, so it cannot be migrated live"
        )
    if "RESUME" in missing:
        why.append("without RESUME a stopped source cannot be restarted by a rollback")
    return (
        f"backend features {uapi.describe_backend_features(features)} lack "
        f"{' and '.join(missing)}: {'; '.join(why)}"
    )


# --- the owner channel ---------------------------------------------------------------------


class OwnerChannel(Protocol):
    """What the device's owner (the VMM) does for the backend; blocking calls."""

    def vrings(self) -> tuple[int, list[uapi.VringRecord]]: ...

    def set_bases(self, vrings: Sequence[uapi.VringRecord]) -> None: ...

    def enable(self, vrings: Sequence[uapi.VringRecord]) -> None: ...

    def close(self) -> None: ...


class OwnerError(Exception):
    """The owner channel failed or the VMM refused; the message says which."""


class SocketOwner:
    """The owner channel over a Unix SEQPACKET socket (see the module docstring)."""

    def __init__(self, path: str, timeout_s: float = OWNER_TIMEOUT_S) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise OwnerError(
                f"cannot reach the VMM's owner channel {path}: {exc.strerror or exc}"
            ) from None

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            try:
                self._sock.send(json.dumps(message).encode())
                raw = self._sock.recv(1 << 20)
            except TimeoutError:
                raise OwnerError(
                    f"the VMM did not answer {message['op']!r} on {self.path}"
                ) from None
            except OSError as exc:
                raise OwnerError(f"owner channel {self.path}: {exc.strerror or exc}") from None
        if not raw:
            raise OwnerError(f"the VMM closed the owner channel {self.path}")
        try:
            reply = json.loads(raw)
        except ValueError:
            raise OwnerError(f"the VMM's reply on {self.path} is not JSON") from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else reply
            raise OwnerError(f"the VMM refused {message['op']!r}: {error}")
        return reply

    def vrings(self) -> tuple[int, list[uapi.VringRecord]]:
        reply = self.request({"op": "vrings"})
        try:
            features = int(reply["features"])
            rings = [
                uapi.VringRecord(
                    index=int(v["index"]),
                    size=int(v["size"]),
                    base=int(v["base"]),
                    enabled=bool(v["enabled"]),
                )
                for v in reply["vrings"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise OwnerError(f"the VMM's 'vrings' reply is malformed: {exc!r}") from None
        return features, rings

    def set_bases(self, vrings: Sequence[uapi.VringRecord]) -> None:
        self.request(
            {
                "op": "set_bases",
                "vrings": [{"index": v.index, "size": v.size, "base": v.base} for v in vrings],
            }
        )

    def enable(self, vrings: Sequence[uapi.VringRecord]) -> None:
        self.request(
            {"op": "enable", "vrings": [{"index": v.index, "enabled": v.enabled} for v in vrings]}
        )

    def close(self) -> None:
        self._sock.close()


# --- the device ----------------------------------------------------------------------------


class VhostVdpaDevice(ThreadedDevice):
    """One vhost-vdpa endpoint; see the module docstring for the rules it keeps."""

    backend: ClassVar[str] = "vhost_vdpa"

    def __init__(
        self,
        name: str,
        side: Side,
        params: VhostVdpaParams,
        *,
        handles: HandleRegistry | None = None,
        owner_factory: Callable[[str], OwnerChannel] = SocketOwner,
    ) -> None:
        super().__init__(name, side)
        self.params = params
        self.handles = handles
        self.owner_factory = owner_factory
        self.identity = params.address
        self.capabilities: Capabilities | None = None
        self.backend_features = 0
        self.device_id = 0
        self.nvqs = 0
        self.config_size = 0

        self._opened = False
        self._fd = -1
        self._owner: OwnerChannel | None = None
        self._state: DeviceState | None = None
        self._record: bytes | None = None
        self._read_at = 0
        self._incoming = bytearray()
        self._applied: uapi.DeviceRecord | None = None
        self._digest: str | None = None
        self._timings: dict[str, float] = {}

    # -- the Device interface --

    async def open(self) -> Capabilities:
        if self._opened:
            raise self._error("open", errno.EBUSY, "the device is already open")
        self._opened = True
        if self.params.handle is not None:
            # The registry is single-threaded trio code: duplicate in the trio thread.
            self._fd = open_handle(
                self.handles, self.params.handle, kind=self.backend, device=self.name
            )
        return await self._in_thread("open", lambda _: self._open_blocking())

    async def device_identity(self) -> Identity:
        """The virtio device id, offered features, config size, queue count and size."""
        return await self._in_thread("identity", lambda _: self._identity_blocking())

    async def get_state(self) -> DeviceState:
        return await self._in_thread("VHOST_VDPA_GET_STATUS", lambda _: self._read_state())

    async def set_state(self, target: DeviceState) -> None:
        await self._in_thread(f"set_state({target.name})", lambda _: self._arc(target))

    async def read(self, max_bytes: int) -> bytes:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        await trio.lowlevel.checkpoint()
        record = self._record
        if self._state is not S.STOP_COPY or record is None:
            raise self._error(
                "read", errno.EINVAL, f"there is no state record to read in {_name(self._state)}"
            )
        chunk = record[self._read_at : self._read_at + max_bytes]
        self._read_at += len(chunk)
        return chunk

    async def write(self, data: StreamChunk) -> None:
        await trio.lowlevel.checkpoint()
        if self._state is not S.RESUMING:
            raise self._error(
                "write",
                errno.EINVAL,
                f"the device loads only in RESUMING, not {_name(self._state)}",
            )
        if len(self._incoming) + len(data) > uapi.MAX_RECORD_BYTES:
            raise self._error(
                "write",
                errno.EFBIG,
                f"the stream passes {uapi.MAX_RECORD_BYTES} bytes: not a vhost-vdpa state record",
            )
        self._incoming += data

    async def precopy_info(self) -> PrecopyInfo:
        await trio.lowlevel.checkpoint()
        raise self._error(
            "precopy_info", errno.EINVAL, "vhost-vdpa has no pre-copy: its state is read stopped"
        )

    async def stop_copy_size(self) -> int:
        await trio.lowlevel.checkpoint()
        # header, config space, one entry per virtqueue, CRC: the record's exact size.
        return len(
            uapi.DeviceRecord(
                0, 0, 0, 0, 0, bytes(self.config_size), tuple(_ring(i) for i in range(self.nvqs))
            ).encode()
        )

    async def reset(self) -> None:
        await self._in_thread("VHOST_VDPA_SET_STATUS(0)", lambda _: self._reset_blocking())

    async def state_digest(self) -> str | None:
        """The sha256 of the state record, as read from the source or written to the
        destination (the device has no digest of its own)."""
        await trio.lowlevel.checkpoint()
        return self._digest

    def timings(self) -> Mapping[str, float]:
        return dict(self._timings)

    # -- releasing (threaded.ThreadedDevice) --

    def _collect_locked(self) -> Callable[[], None] | None:
        if not self._closed:
            return None
        fd, self._fd = self._fd, -1
        owner, self._owner = self._owner, None

        def release() -> None:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if owner is not None:
                owner.close()

        return release

    # -- blocking work --

    def _open_blocking(self) -> Capabilities:
        params = self.params
        if params.fd is not None:
            try:
                self._fd = fcntl.fcntl(params.fd, fcntl.F_DUPFD_CLOEXEC, 3)
            except OSError as exc:
                raise self._error(
                    "open",
                    exc.errno or errno.EBADF,
                    "the plan names an inherited descriptor this process does not have "
                    "(start `orchestrator run` from the VMM with the descriptor passed on)",
                ) from None
        try:
            check_kind(self._fd, "vhost_vdpa")
        except HandoverError as exc:
            raise self._error("open", errno.ENODEV, exc.message) from None
        self._describe_fd()
        self.backend_features = self._u64(uapi.VHOST_GET_BACKEND_FEATURES)
        why = refusal(self.backend_features)
        if why is not None:
            raise self._error("VHOST_GET_BACKEND_FEATURES", errno.EOPNOTSUPP, why)
        self.device_id = self._u32(uapi.VHOST_VDPA_GET_DEVICE_ID)
        self.nvqs = self._u32(uapi.VHOST_VDPA_GET_VQS_COUNT)
        self.config_size = self._u32(uapi.VHOST_VDPA_GET_CONFIG_SIZE)
        status = self._status()
        if self.side is Side.DESTINATION and status & (
            uapi.STATUS_FEATURES_OK | uapi.STATUS_DRIVER_OK
        ):
            raise self._error(
                "open",
                errno.EBUSY,
                f"the destination device's status is {uapi.describe_status(status)}: its VMM "
                "must set up memory and rings but leave feature negotiation and DRIVER_OK to "
                "the migration, which brings the source's",
            )
        try:
            self._owner = self.owner_factory(params.owner_socket)
        except OwnerError as exc:
            raise self._error("owner channel", errno.ECONNREFUSED, str(exc)) from None
        self._state = S.RUNNING
        self._read_state()
        self.capabilities = CAPABILITIES
        return CAPABILITIES

    def _describe_fd(self) -> None:
        with contextlib.suppress(OSError):
            st = os.fstat(self._fd)
            if stat.S_ISCHR(st.st_mode):
                node = f"vhost-vdpa {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/self/fd/{self._fd}")
                    node = target if target.startswith("/dev/") else node
                self.identity = f"{node} ({self.params.address})"

    def _read_state(self) -> DeviceState:
        status = self._status()
        if status & (uapi.STATUS_FAILED | uapi.STATUS_NEEDS_RESET):
            self._state = S.ERROR
        if self._state is None:
            raise self._error("VHOST_VDPA_GET_STATUS", errno.EBADF, "the device is not open")
        return self._state

    def _arc(self, target: DeviceState) -> None:
        before = self._state
        operation = f"set_state({target.name})"
        if before is None:
            raise self._error(operation, errno.EBADF, "the device is not open", target)
        if not is_arc(CAPABILITIES.flags, before, target):
            raise self._error(
                operation,
                errno.EINVAL,
                f"{before.name} -> {target.name} is not one arc of a vhost-vdpa device "
                "(STOP_COPY and P2P, no pre-copy)",
                target,
            )
        if before is S.RUNNING:  # -> RUNNING_P2P or -> STOP: stop processing
            self._timed("suspend", lambda: self._ioctl(uapi.VHOST_VDPA_SUSPEND, None, target))
        elif target is S.RUNNING:  # RUNNING_P2P -> RUNNING
            key = "resume" if self._applied is not None else "rollback_resume"
            self._timed(key, lambda: self._ioctl(uapi.VHOST_VDPA_RESUME, None, target))
        elif before is S.STOP and target is S.RUNNING_P2P and self._applied is not None:
            applied = self._applied
            self._timed("start", lambda: self._start(applied, target))
        elif target is S.STOP_COPY:
            self._timed("state_read", lambda: self._save(target))
        elif before is S.STOP_COPY:
            self._record = None
        elif target is S.RESUMING:
            self._incoming = bytearray()
            self._applied = None
        elif before is S.RESUMING:
            self._timed("restore", lambda: self._restore(target))
        # RUNNING_P2P -> STOP and a source's STOP -> RUNNING_P2P: still suspended.
        self._state = target

    def _save(self, target: DeviceState) -> None:
        status = self._status(target)
        config = self._config(target)
        device_features = self._u64(uapi.VHOST_GET_FEATURES, target=target)
        features, vrings = self._ask_owner("vrings", lambda o: o.vrings(), target)
        if features & ~device_features:
            raise self._error(
                "owner channel",
                errno.EPROTO,
                f"the VMM says it negotiated features {features:#x}, which the device does not "
                f"offer ({device_features:#x})",
                target,
            )
        self._check_vrings(vrings, target)
        record = uapi.DeviceRecord(
            device_id=self.device_id,
            features=features,
            device_features=device_features,
            backend_features=self.backend_features,
            status=status,
            config=config,
            vrings=tuple(sorted(vrings, key=lambda v: v.index)),
        ).encode()
        self._record, self._read_at = record, 0
        self._digest = hashlib.sha256(record).hexdigest()

    def _restore(self, target: DeviceState) -> None:
        data = bytes(self._incoming)
        self._digest = hashlib.sha256(data).hexdigest()
        try:
            record = uapi.DeviceRecord.decode(data)
        except uapi.RecordError as exc:
            raise self._error("restore", errno.EPROTO, str(exc), target) from None
        if record.device_id != self.device_id:
            raise self._error(
                "restore",
                errno.EINVAL,
                f"the source is a virtio {_device_name(record.device_id)} device, this one a "
                f"{_device_name(self.device_id)} device",
                target,
            )
        offered = self._u64(uapi.VHOST_GET_FEATURES, target=target)
        if record.features & ~offered:
            raise self._error(
                "restore",
                errno.EINVAL,
                f"the source negotiated features {record.features:#x}; this device lacks "
                f"{record.features & ~offered:#x} (it offers {offered:#x})",
                target,
            )
        self._check_vrings(list(record.vrings), target)
        status = self._status(target)
        if status & (uapi.STATUS_FEATURES_OK | uapi.STATUS_DRIVER_OK):
            raise self._error(
                "restore",
                errno.EBUSY,
                f"the device's status is {uapi.describe_status(status)}; features can only be "
                "set before FEATURES_OK",
                target,
            )
        # The uAPI order: ACKNOWLEDGE, DRIVER, features, FEATURES_OK; bases before DRIVER_OK.
        wanted = record.status & (
            uapi.STATUS_ACKNOWLEDGE | uapi.STATUS_DRIVER | uapi.STATUS_FEATURES_OK
        )
        early = wanted & (uapi.STATUS_ACKNOWLEDGE | uapi.STATUS_DRIVER)
        if early:
            self._set_status(early, target)
        if wanted & uapi.STATUS_FEATURES_OK:
            self._u64(uapi.VHOST_SET_FEATURES, record.features, target=target)
            self._set_status(wanted, target)
            now = self._status(target)
            if not now & uapi.STATUS_FEATURES_OK:
                raise self._error(
                    "VHOST_VDPA_SET_STATUS",
                    errno.EINVAL,
                    f"the device did not keep FEATURES_OK for the source's features "
                    f"{record.features:#x} (status {uapi.describe_status(now)})",
                    target,
                )
        config = self._config(target)
        if config != record.config:
            raise self._error(
                "restore",
                errno.EINVAL,
                f"the config space differs from the source's at "
                f"{_differences(record.config, config)} (for a NIC: provision the "
                "destination with the VM's MAC address and the same queue pairs and MTU)",
                target,
            )
        if record.vrings:
            self._ask_owner("set_bases", lambda o: o.set_bases(record.vrings), target)
        self._applied = record

    def _start(self, record: uapi.DeviceRecord, target: DeviceState) -> None:
        enable_after = bool(self.backend_features & uapi.bit(uapi.BACKEND_F_ENABLE_AFTER_DRIVER_OK))
        vrings = record.vrings
        if record.status & uapi.STATUS_DRIVER_OK:
            if vrings and not enable_after:
                self._ask_owner("enable", lambda o: o.enable(vrings), target)
            self._set_status(self._status(target) | uapi.STATUS_DRIVER_OK, target)
            self._ioctl(uapi.VHOST_VDPA_SUSPEND, None, target)
            if vrings and enable_after:
                self._ask_owner("enable", lambda o: o.enable(vrings), target)
        elif vrings:
            self._ask_owner("enable", lambda o: o.enable(vrings), target)

    def _reset_blocking(self) -> None:
        self._set_status(0, None)
        self._state = S.RUNNING
        self._applied = None
        self._record = None
        if self._status(None) & (uapi.STATUS_FAILED | uapi.STATUS_NEEDS_RESET):
            raise self._error("VHOST_VDPA_SET_STATUS(0)", errno.EIO, "the reset did not clear it")

    def _check_vrings(self, vrings: Sequence[uapi.VringRecord], target: DeviceState) -> None:
        seen = set()
        for v in vrings:
            problem = None
            if v.index >= self.nvqs:
                problem = f"virtqueue {v.index} does not exist (the device has {self.nvqs})"
            elif v.index in seen:
                problem = f"virtqueue {v.index} appears twice"
            elif not 0 < v.size <= 0xFFFF or v.size & (v.size - 1):
                problem = f"virtqueue {v.index} has size {v.size}, not a power of two <= 32768"
            elif not 0 <= v.base <= 0xFFFFFFFF:
                problem = f"virtqueue {v.index} has ring position {v.base}"
            if problem is not None:
                raise self._error("owner channel", errno.EPROTO, problem, target)
            seen.add(v.index)

    def _ask_owner(self, op: str, fn: Callable[[OwnerChannel], T], target: DeviceState | None) -> T:
        owner = self._owner
        if owner is None:
            raise self._error(f"owner channel ({op})", errno.EBADF, "not connected", target)
        try:
            return fn(owner)
        except OwnerError as exc:
            raise self._error(f"owner channel ({op})", errno.EIO, str(exc), target) from None

    def _timed(self, key: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        fn()
        self._timings[key] = round(
            self._timings.get(key, 0.0) + (time.perf_counter() - start) * 1000, 3
        )

    # -- ioctls --

    def _ioctl(self, request: int, buf: bytearray | None, target: DeviceState | None) -> None:
        fd = self._fd
        if fd < 0:
            raise self._error(
                uapi.ioctl_name(request), errno.EBADF, "the device is not open", target
            )
        try:
            if buf is None:
                fcntl.ioctl(fd, request)
            else:
                fcntl.ioctl(fd, request, buf, True)
        except OSError as exc:
            err = exc.errno or errno.EIO
            hint = ""
            if err == errno.EPERM and request in uapi.OWNER_ONLY:
                hint = "vhost serves this to the device's owner (the VMM) only"
            raise self._error(uapi.ioctl_name(request), err, hint, target) from None

    def _u64(self, request: int, value: int = 0, *, target: DeviceState | None = None) -> int:
        buf = bytearray(uapi.U64.pack(value))
        self._ioctl(request, buf, target)
        return int(uapi.U64.unpack(buf)[0])

    def _identity_blocking(self) -> Identity:
        return vdpa_identity(
            device_id=self.device_id,
            features=self._u64(uapi.VHOST_GET_FEATURES),
            config_size=self.config_size,
            queues=self.nvqs,
            queue_size=self._u16(uapi.VHOST_VDPA_GET_VRING_NUM),
            caps=self.capabilities,
        )

    def _u16(self, request: int) -> int:
        buf = bytearray(uapi.U16.size)
        self._ioctl(request, buf, None)
        return int(uapi.U16.unpack(buf)[0])

    def _u32(self, request: int) -> int:
        buf = bytearray(uapi.U32.size)
        self._ioctl(request, buf, None)
        return int(uapi.U32.unpack(buf)[0])

    def _status(self, target: DeviceState | None = None) -> int:
        buf = bytearray(1)
        self._ioctl(uapi.VHOST_VDPA_GET_STATUS, buf, target)
        return buf[0]

    def _set_status(self, status: int, target: DeviceState | None) -> None:
        self._ioctl(uapi.VHOST_VDPA_SET_STATUS, bytearray([status]), target)

    def _config(self, target: DeviceState | None) -> bytes:
        if not self.config_size:
            return b""
        buf = uapi.config_request(0, self.config_size)
        self._ioctl(uapi.VHOST_VDPA_GET_CONFIG, buf, target)
        return uapi.config_data(buf)


def _ring(index: int) -> uapi.VringRecord:
    return uapi.VringRecord(index, 1, 0, False)


def _name(state: DeviceState | None) -> str:
    return "an unknown state" if state is None else state.name


def _device_name(device_id: int) -> str:
    return uapi.DEVICE_NAMES.get(device_id, f"id {device_id}")


def _differences(a: bytes, b: bytes) -> str:
    """Byte ranges where ``a`` and ``b`` differ, as ``"bytes 0-5 (52540012... vs ...)"``."""
    if len(a) != len(b):
        return f"its length ({len(a)} bytes on the source, {len(b)} here)"
    ranges: list[tuple[int, int]] = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            if ranges and ranges[-1][1] == i - 1:
                ranges[-1] = (ranges[-1][0], i)
            else:
                ranges.append((i, i))
    return ", ".join(
        f"bytes {s}-{e} ({a[s : e + 1].hex()} on the source, {b[s : e + 1].hex()} here)"
        for s, e in ranges[:4]
    )


# --- the backend ---------------------------------------------------------------------------


#: The identity fields of a vhost-vdpa device (``orchestrator.compat``).
IDENTITY_FIELDS = (
    "config_size",
    "device_id",
    FEATURES_FIELD,
    CAPABILITIES_FIELD,
    "queue_size",
    "queues",
)


def vdpa_identity(
    *,
    device_id: int,
    features: int,
    config_size: int,
    queues: int,
    queue_size: int,
    caps: Capabilities | None,
) -> Identity:
    """A vDPA device's identity: its virtio device id (the model, ``virtio-<id>``),
    the features it offers (the destination must offer the source's), its config
    space size, and its virtqueues' count and size (``VHOST_VDPA_GET_VRING_NUM``)."""
    fields: dict[str, FieldValue] = {
        "device_id": device_id,
        FEATURES_FIELD: features,
        "config_size": config_size,
        "queues": queues,
        "queue_size": queue_size,
    }
    if caps is not None:
        fields[CAPABILITIES_FIELD] = capability_names(caps)
    return Identity("vhost_vdpa", f"virtio-{device_id}", fields)


class VhostVdpaBackend(Backend):
    """``backend = "vhost_vdpa"``: vDPA devices a VMM owns, on this host."""

    name: ClassVar[str] = "vhost_vdpa"
    params_model: ClassVar[type[BaseModel]] = VhostVdpaParams
    identity_fields: ClassVar[tuple[str, ...]] = IDENTITY_FIELDS

    def present(self) -> bool:
        return os.path.isdir("/sys/bus/vdpa")

    def __init__(
        self,
        handles: HandleRegistry | None = None,
        owner_factory: Callable[[str], OwnerChannel] = SocketOwner,
    ) -> None:
        self.handles = handles
        self.owner_factory = owner_factory

    def __repr__(self) -> str:
        return f"<VhostVdpaBackend handles={'yes' if self.handles is not None else 'no'}>"

    def with_handles(self, handles: HandleRegistry) -> VhostVdpaBackend:
        return VhostVdpaBackend(handles, self.owner_factory)

    def check_pair(self, source: BaseModel, destination: BaseModel) -> list[Problem]:
        """Inherited descriptors are checked here, before anything runs: each must be an
        open vhost-vdpa device that can be suspended and resumed, and the two must be
        two devices.  Handles are checked by the daemon's registry, and their devices
        when they are opened."""
        problems: list[Problem] = []
        devices: dict[str, tuple[int, int]] = {}
        for where, params in (("source", _params(source)), ("destination", _params(destination))):
            if params.fd is None:
                continue
            try:
                check_kind(params.fd, "vhost_vdpa")
                features = read_backend_features(params.fd)
                st = os.fstat(params.fd)
            except HandoverError as exc:
                problems.append(Problem(f"{where}.fd", f"descriptor {params.fd}: {exc.message}"))
                continue
            except OSError as exc:
                problems.append(
                    Problem(
                        f"{where}.fd",
                        f"descriptor {params.fd}: VHOST_GET_BACKEND_FEATURES: {exc.strerror}",
                    )
                )
                continue
            why = refusal(features)
            if why is not None:
                problems.append(Problem(f"{where}.fd", f"descriptor {params.fd}: {why}"))
            devices[where] = (st.st_dev, st.st_ino) if not st.st_rdev else (0, st.st_rdev)
        if len(devices) == 2 and devices["source"] == devices["destination"]:
            problems.append(
                Problem("destination.fd", "the destination is the source device itself")
            )
        if _params(source).owner_socket == _params(destination).owner_socket:
            problems.append(
                Problem(
                    "destination.owner_socket",
                    "the source and the destination name the same owner channel; each device "
                    "has its own",
                )
            )
        return problems

    def device_keys(self, name: str, source: BaseModel, destination: BaseModel) -> list[str]:
        keys = []
        for params in (_params(source), _params(destination)):
            if params.handle is not None:
                keys.append(handle_key(self.name, params.handle))
            else:
                keys.append(f"{self.name}:fd:{params.fd}")
        return keys

    def create(self, name: str, side: Side, params: BaseModel) -> VhostVdpaDevice:
        return VhostVdpaDevice(
            name, side, _params(params), handles=self.handles, owner_factory=self.owner_factory
        )
