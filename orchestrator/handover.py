"""The device handover socket: where a VMM lends the daemon a device it holds.

In production the VMM (QEMU, cloud-hypervisor) opened the VM's VFIO and
vhost-vdpa devices long before any migration, and a vhost-vdpa device opens
only once.  So the VMM hands the daemon its descriptor over a Unix socket
(``SCM_RIGHTS``), the daemon keeps it under a *handle*, ``"<vm>/<device>"``,
and a plan names the device by that handle (``handle = "vm1/nic0"`` in a
device's parameters) instead of a path.

The protocol
------------

A ``SOCK_SEQPACKET`` Unix socket, mode 0600.  SEQPACKET, not a byte stream,
because a message and the descriptors sent with it arrive together or not at
all: on a stream socket a descriptor rides on some byte of the stream and a
request split across reads would have to be matched to it by hand.  Each
request is one message: one JSON object (UTF-8, at most
``MAX_REQUEST_BYTES``), with at most one descriptor attached.  Each gets one
reply, ``{"ok": true, ...}`` or ``{"ok": false, "error": {"code", "message"}}``:

* ``{"op": "register", "vm": VM}``: this connection serves VM (a connection
  may serve several VMs; a VM has one connection at a time).
* ``{"op": "hand_over", "vm": VM, "device": NAME, "kind": "vfio" |
  "vhost_vdpa"}`` with exactly one descriptor: reply ``{"handle": "VM/NAME"}``.
  VM must be registered on this connection, and the descriptor must be what
  ``kind`` says, checked on the descriptor itself (``check_kind``).
* ``{"op": "take_back", "handle": H}``: the reply carries the descriptor back
  and the daemon closes its copy; refused (``in_use``) while a migration
  uses the handle.
* ``{"op": "unregister", "vm": VM}``: take back nothing, release the VM's
  handles (refused while one is in use).
* ``{"op": "list"}``: this connection's VMs and handles.

A refusal changes nothing, and any descriptor that came with it is closed.
A message that is not a JSON object, or too large to be one, gets a
``bad_request`` or ``too_large`` error and the connection is closed: a peer
that sends garbage is not speaking this protocol.  A VMM that disconnects
releases its handles: the daemon closes its copies at once, except those a
migration uses, which it closes when that migration ends.  Peer credentials
(``SO_PEERCRED``) are logged with every connection.

Invariants it keeps:

* Every descriptor the daemon receives is either kept by the registry or
  closed before the reply goes out; every one the registry keeps is closed
  exactly once (taken back, released, or ``close_all``).
* A handle a migration has claimed stays open until ``release`` of that
  migration, whatever its VMM does meanwhile.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import stat
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from orchestrator.errors import OrchestratorError
from orchestrator.plan import NAME_PATTERN

log = structlog.get_logger("orchestrator.handover")

#: The device kinds a VMM may hand over; also the backend names that use them.
KINDS: Final = ("vfio", "vhost_vdpa")
#: The backend parameter that names a handle instead of a device path.
HANDLE_PARAM: Final = "handle"
#: Largest request accepted; a handover request is about 100 bytes.
MAX_REQUEST_BYTES: Final = 64 * 1024
#: Descriptors read from one message: more than one is refused, and more than
#: this many are dropped by the kernel (MSG_CTRUNC) and refused as well.
RECEIVE_FDS: Final = 8
MAX_CONNECTIONS: Final = 64
MAX_HANDLES: Final = 1024

_NAME = re.compile(NAME_PATTERN)
_INT = struct.calcsize("i")


class HandoverError(OrchestratorError):
    """A handover request refused; ``code`` is its machine-readable reason."""

    status_hint = 409

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class HandleBusy(OrchestratorError):
    """A plan names a handle another unfinished migration uses."""

    status_hint = 409


# -- what a descriptor is --------------------------------------------------------


def char_device_names(path: Path = Path("/proc/devices")) -> dict[int, str]:
    """Character device majors -> the name their driver registered (``/proc/devices``)."""
    names: dict[int, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return names
    in_char = False
    for line in text.splitlines():
        if line.strip().endswith(":"):
            in_char = line.strip() == "Character devices:"
            continue
        parts = line.split(None, 1)
        if in_char and len(parts) == 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1].strip()
    return names


def describe_fd(fd: int, majors: Mapping[int, str]) -> str:
    """What ``fd`` is, in words, for error messages and logs."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        return f"not an open descriptor ({exc.strerror})"
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = "?"
    if stat.S_ISCHR(st.st_mode):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        driver = majors.get(major, "an unregistered major")
        return f"the character device {target} ({major}:{minor}, driver {driver!r})"
    for test, what in (
        (stat.S_ISREG, "the regular file"),
        (stat.S_ISDIR, "the directory"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISBLK, "the block device"),
    ):
        if test(st.st_mode):
            return f"{what} {target}" if target.startswith("/") else what
    return target  # anon_inode:[eventfd] and the like


def check_kind(fd: int, kind: str, majors: Mapping[int, str] | None = None) -> None:
    """Refuse (``wrong_kind``) a descriptor that is not an open ``kind`` device.

    * ``vfio``: a VFIO device, opened through its group
      (``VFIO_GROUP_GET_DEVICE_FD`` makes an anonymous inode whose
      ``/proc/self/fd`` link reads ``anon_inode:[vfio-device]``) or as a
      device cdev (``/dev/vfio/devices/vfioN``, a character device of the
      major registered as ``vfio-dev``).  A group (``/dev/vfio/N``, major
      ``vfio``) is not a device.
    * ``vhost_vdpa``: a character device of the major registered as
      ``vhost-vdpa`` (``/dev/vhost-vdpa-N``).

    Both must be open for reading and writing, as a VMM opens them.
    ``majors`` is ``char_device_names()`` unless given.
    """
    if kind not in KINDS:
        raise HandoverError("bad_kind", f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    names = char_device_names() if majors is None else majors
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise HandoverError("wrong_kind", f"the descriptor is unusable: {exc.strerror}") from None
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    driver = names.get(os.major(st.st_rdev)) if stat.S_ISCHR(st.st_mode) else None
    if kind == "vfio":
        ok = target == "anon_inode:[vfio-device]" or driver == "vfio-dev"
        expected = "a VFIO device (anon_inode:[vfio-device], or /dev/vfio/devices/vfioN)"
        if driver == "vfio":
            raise HandoverError(
                "wrong_kind",
                f"the descriptor is the VFIO group {target}, not a device: hand over the "
                "descriptor VFIO_GROUP_GET_DEVICE_FD returned",
            )
    else:
        ok = driver == "vhost-vdpa"
        expected = "a vhost-vdpa device (/dev/vhost-vdpa-N)"
    if not ok:
        raise HandoverError(
            "wrong_kind", f"the descriptor is {describe_fd(fd, names)}, not {expected}"
        )
    if flags & os.O_ACCMODE != os.O_RDWR:
        raise HandoverError(
            "wrong_kind",
            f"the {kind} descriptor {target} is not open for reading and writing (O_RDWR)",
        )


# -- the registry ------------------------------------------------------------------


@dataclass
class HandedOver:
    """One device a VMM handed over."""

    vm: str
    device: str
    kind: str
    fd: int
    #: The connection that handed it over (None once it disconnected).
    owner: int | None
    #: The migration that uses it, if any.
    migration: str | None = None

    @property
    def handle(self) -> str:
        return f"{self.vm}/{self.device}"


class HandleRegistry:
    """The descriptors VMMs handed over, by handle.

    Plain synchronous code: the handover server (on the VMM side), the
    migration service (claims and releases) and backends (``open``) share it
    in one trio thread.
    """

    def __init__(self, *, max_handles: int = MAX_HANDLES) -> None:
        self.max_handles = max_handles
        self._handles: dict[str, HandedOver] = {}
        self._vms: dict[str, int] = {}

    # -- the VMM's side ------------------------------------------------------------

    def register_vm(self, owner: int, vm: str) -> None:
        holder = self._vms.get(vm)
        if holder is not None and holder != owner:
            raise HandoverError(
                "vm_taken", f"VM {vm!r} is registered by another VMM connection ({holder})"
            )
        self._vms[vm] = owner

    def unregister_vm(self, owner: int, vm: str) -> list[str]:
        self._require_vm(owner, vm)
        mine = [h for h in self._handles.values() if h.vm == vm]
        self._refuse_in_use(mine, "unregister")
        for entry in mine:
            self._drop(entry)
        del self._vms[vm]
        return [e.handle for e in mine]

    def hand_over(self, owner: int, vm: str, device: str, kind: str, fd: int) -> HandedOver:
        """Keep ``fd`` (the registry owns it from now on) as ``vm/device``."""
        self._require_vm(owner, vm)
        handle = f"{vm}/{device}"
        if handle in self._handles:
            raise HandoverError(
                "duplicate", f"{handle!r} is already handed over: take it back first"
            )
        if len(self._handles) >= self.max_handles:
            raise HandoverError("limit", f"the daemon holds {self.max_handles} handles already")
        entry = HandedOver(vm=vm, device=device, kind=kind, fd=fd, owner=owner)
        self._handles[handle] = entry
        return entry

    def take_back(self, owner: int, handle: str) -> int:
        """Remove ``handle`` and return its descriptor: the caller sends and closes it."""
        entry = self._handles.get(handle)
        if entry is None or entry.owner != owner:
            known = ", ".join(sorted(h.handle for h in self._handles.values() if h.owner == owner))
            raise HandoverError(
                "unknown_handle",
                f"this connection handed over no {handle!r} (its handles: {known or 'none'})",
            )
        self._refuse_in_use([entry], "take back")
        del self._handles[handle]
        return entry.fd

    def release_owner(self, owner: int) -> None:
        """The connection ``owner`` went away: close what no migration uses."""
        for vm in [vm for vm, o in self._vms.items() if o == owner]:
            del self._vms[vm]
        for entry in [h for h in self._handles.values() if h.owner == owner]:
            entry.owner = None
            if entry.migration is None:
                self._drop(entry)
            else:
                log.warning(
                    "handover.orphaned",
                    handle=entry.handle,
                    migration=entry.migration,
                    hint="kept until the migration ends",
                )

    def listing(self, owner: int) -> dict[str, Any]:
        return {
            "vms": sorted(vm for vm, o in self._vms.items() if o == owner),
            "handles": [
                {"handle": h.handle, "kind": h.kind, "in_use_by": h.migration}
                for h in sorted(self._handles.values(), key=lambda h: h.handle)
                if h.owner == owner
            ],
        }

    # -- the migrations' side ------------------------------------------------------------

    def handed_over(self) -> list[HandedOver]:
        """Every device handed over now, by handle."""
        return [self._handles[h] for h in sorted(self._handles)]

    def lookup(self, handle: str) -> HandedOver | None:
        return self._handles.get(handle)

    def plan_problem(self, handle: str, vm: str, backend: str) -> str | None:
        """Why a plan for ``vm`` cannot use ``handle`` with ``backend``, if it cannot."""
        entry = self._handles.get(handle)
        if entry is None:
            known = ", ".join(sorted(h for h in self._handles if h.startswith(f"{vm}/")))
            return (
                f"no device is handed over as {handle!r} (handles of VM {vm!r}: "
                f"{known or 'none'}); a VMM hands devices over on the daemon's handover socket"
            )
        if entry.vm != vm:
            return f"{handle!r} is a device of VM {entry.vm!r}, and the plan migrates {vm!r}"
        if backend in KINDS and backend != entry.kind:
            return f"{handle!r} was handed over as a {entry.kind} device, not {backend}"
        return None

    def claim(self, migration: str, handles: Iterable[str]) -> None:
        """Mark ``handles`` used by ``migration``: all of them, or none (HandleBusy)."""
        wanted = list(dict.fromkeys(handles))
        missing = [h for h in wanted if h not in self._handles]
        if missing:
            raise HandleBusy(f"no longer handed over: {', '.join(missing)}")
        busy = [
            f"{h} (migration {self._handles[h].migration})"
            for h in wanted
            if self._handles[h].migration not in (None, migration)
        ]
        if busy:
            raise HandleBusy(f"handles already used by an unfinished migration: {', '.join(busy)}")
        for h in wanted:
            self._handles[h].migration = migration

    def release(self, migration: str) -> None:
        """``migration`` ended: its handles may be taken back; orphans are closed."""
        for entry in [h for h in self._handles.values() if h.migration == migration]:
            entry.migration = None
            if entry.owner is None:
                self._drop(entry)

    def open(self, handle: str) -> int:
        """A new descriptor (close-on-exec) for ``handle``'s device, which the caller
        owns and closes; the backends' way in.  ``unknown_handle`` if there is none."""
        entry = self._handles.get(handle)
        if entry is None:
            raise HandoverError("unknown_handle", f"no device is handed over as {handle!r}")
        return fcntl.fcntl(entry.fd, fcntl.F_DUPFD_CLOEXEC, 0)

    def close_all(self) -> None:
        for entry in list(self._handles.values()):
            self._drop(entry)
        self._vms.clear()

    def __len__(self) -> int:
        return len(self._handles)

    # -- internals ------------------------------------------------------------------------

    def _require_vm(self, owner: int, vm: str) -> None:
        if self._vms.get(vm) != owner:
            mine = sorted(v for v, o in self._vms.items() if o == owner)
            raise HandoverError(
                "unknown_vm",
                f"VM {vm!r} is not registered on this connection (registered: "
                f"{', '.join(mine) or 'none'}); send {{'op': 'register', 'vm': ...}} first",
            )

    @staticmethod
    def _refuse_in_use(entries: list[HandedOver], what: str) -> None:
        used = [f"{e.handle} (migration {e.migration})" for e in entries if e.migration]
        if used:
            raise HandoverError(
                "in_use", f"cannot {what} while a migration uses it: {', '.join(used)}"
            )

    def _drop(self, entry: HandedOver) -> None:
        if self._handles.get(entry.handle) is entry:
            del self._handles[entry.handle]
        with contextlib.suppress(OSError):
            os.close(entry.fd)


# -- the server ------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


class _Fatal(HandoverError):
    """A refusal after which the connection closes: the peer is not speaking this protocol."""


class HandoverServer:
    """Serves the handover protocol on a listening SEQPACKET socket."""

    def __init__(
        self,
        registry: HandleRegistry,
        *,
        char_devices: Callable[[], Mapping[int, str]] = char_device_names,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.registry = registry
        #: Read at every check: drivers load and unload while the daemon runs.
        self.char_devices = char_devices
        self.max_connections = max_connections
        self._connections = 0
        self._next_owner = 0

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listener`` (bound, listening) until cancelled."""
        sock = trio.socket.from_stdlib_socket(listener)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.warning("handover.accept_failed", error=str(exc))
                            await trio.sleep(0.1)
                            continue
                        raise
                    self._next_owner += 1
                    nursery.start_soon(self._serve_connection, conn, self._next_owner)
        finally:
            sock.close()

    async def _serve_connection(self, conn: trio.socket.SocketType, owner: int) -> None:
        with conn:
            try:
                peer = peer_credentials(conn)
            except OSError:
                peer = PeerCredentials(-1, -1, -1)
            self._connections += 1
            try:
                if self._connections > self.max_connections:
                    await self._reply(
                        conn,
                        _failure(
                            "limit", f"the daemon serves {self.max_connections} VMM connections"
                        ),
                    )
                    log.warning("handover.refused", connection=owner, pid=peer.pid, uid=peer.uid)
                    return
                log.info(
                    "handover.connected", connection=owner, pid=peer.pid, uid=peer.uid, gid=peer.gid
                )
                await self._requests(conn, owner, peer)
            finally:
                self._connections -= 1
                self.registry.release_owner(owner)
                log.info("handover.disconnected", connection=owner, pid=peer.pid)

    async def _requests(
        self, conn: trio.socket.SocketType, owner: int, peer: PeerCredentials
    ) -> None:
        while True:
            try:
                data, ancdata, flags, _ = await conn.recvmsg(
                    MAX_REQUEST_BYTES,
                    socket.CMSG_SPACE(RECEIVE_FDS * _INT),
                    socket.MSG_CMSG_CLOEXEC,
                )
            except OSError as exc:
                log.info("handover.receive_failed", connection=owner, error=str(exc))
                return
            fds = _received_fds(ancdata)
            if not data and not fds:
                return  # the peer closed the connection
            reply: dict[str, Any]
            send: list[int] = []
            fatal = False
            try:
                _check_flags(flags)
                request = _parse(data)
                taken, fds = fds, []  # _handle owns them from here, kept or closed
                reply, send = self._handle(owner, request, taken)
            except HandoverError as exc:
                reply = _failure(exc.code, exc.message)
                fatal = isinstance(exc, _Fatal)
                log.info(
                    "handover.refused",
                    connection=owner,
                    pid=peer.pid,
                    code=exc.code,
                    message=exc.message,
                    closing=fatal,
                )
            finally:
                _close_all(fds)
            try:
                await self._reply(conn, reply, send)
            finally:
                _close_all(send)
            if fatal:
                return

    def _handle(
        self, owner: int, request: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        """One request; returns the reply and the descriptors to send with it.

        Descriptors in ``fds`` that the registry does not keep are closed here,
        on success and refusal alike.
        """
        kept: int | None = None
        try:
            op = request.get("op")
            if op == "hand_over":
                vm, device = _name(request, "vm"), _name(request, "device")
                kind = request.get("kind")
                if kind not in KINDS:
                    raise HandoverError(
                        "bad_kind", f"kind must be one of {', '.join(KINDS)}, not {kind!r}"
                    )
                if len(fds) != 1:
                    raise HandoverError(
                        "no_descriptor" if not fds else "too_many_descriptors",
                        f"hand_over takes exactly one descriptor (SCM_RIGHTS), got {len(fds)}",
                    )
                check_kind(fds[0], kind, self.char_devices())
                entry = self.registry.hand_over(owner, vm, device, kind, fds[0])
                kept = fds[0]
                log.info("handover.kept", connection=owner, handle=entry.handle, kind=kind)
                return {"ok": True, "handle": entry.handle, "kind": kind}, []
            if fds:
                raise HandoverError(
                    "unexpected_descriptor", f"{op!r} takes no descriptor; it was closed"
                )
            if op == "register":
                vm = _name(request, "vm")
                self.registry.register_vm(owner, vm)
                return {"ok": True, "vm": vm}, []
            if op == "unregister":
                released = self.registry.unregister_vm(owner, _name(request, "vm"))
                return {"ok": True, "released": released}, []
            if op == "take_back":
                handle = request.get("handle")
                if not isinstance(handle, str):
                    raise HandoverError("bad_request", "take_back needs a string 'handle'")
                fd = self.registry.take_back(owner, handle)
                log.info("handover.taken_back", connection=owner, handle=handle)
                return {"ok": True, "handle": handle}, [fd]
            if op == "list":
                return {"ok": True, **self.registry.listing(owner)}, []
            raise HandoverError(
                "unknown_op",
                f"unknown op {op!r} (known: register, hand_over, take_back, unregister, list)",
            )
        finally:
            _close_all(fd for fd in fds if fd != kept)

    async def _reply(
        self, conn: trio.socket.SocketType, reply: dict[str, Any], fds: list[int] | None = None
    ) -> None:
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        with contextlib.suppress(OSError):
            await conn.sendmsg([json.dumps(reply).encode()], ancillary)


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _INT
            fds.extend(array.array("i", data[:usable]))
    return fds


def _check_flags(flags: int) -> None:
    if flags & socket.MSG_TRUNC:
        raise _Fatal("too_large", f"a request is one message of at most {MAX_REQUEST_BYTES} bytes")
    if flags & socket.MSG_CTRUNC:
        raise HandoverError(
            "too_many_descriptors",
            f"over {RECEIVE_FDS} descriptors attached; a request takes at most one",
        )


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        request = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Fatal("bad_request", f"a request is one JSON object in UTF-8: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise _Fatal("bad_request", 'a request is a JSON object with a string "op"')
    return request


def _name(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not _NAME.match(value):
        raise HandoverError(
            "bad_request",
            f"{key!r} must be a name of 1 to 128 letters, digits and _.:@- (got {value!r})",
        )
    return value


def _failure(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


# -- the client ----------------------------------------------------------------------------


class HandoverClient:
    """A VMM's end of the handover socket (blocking; one request at a time).

    ``with HandoverClient(path) as c: c.register("vm1"); handle =
    c.hand_over("vm1", "nic0", "vhost_vdpa", fd)``.  The daemon keeps the
    handle while this connection stays open; refusals raise HandoverError.
    """

    def __init__(self, path: Path | str, *, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(os.fspath(self.path))
        except OSError:
            self.sock.close()
            raise

    def request(
        self, message: dict[str, Any], fds: Iterable[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        """Send one request; returns the reply and the descriptors that came with it."""
        fd_list = list(fds)
        data = json.dumps(message).encode()
        if fd_list:
            socket.send_fds(self.sock, [data], fd_list)
        else:
            self.sock.send(data)
        raw, received, _flags, _ = socket.recv_fds(self.sock, MAX_REQUEST_BYTES, RECEIVE_FDS)
        if not raw:
            _close_all(received)
            raise ConnectionError(f"the daemon closed the handover connection {self.path}")
        return json.loads(raw), received

    def call(
        self, message: dict[str, Any], fds: Iterable[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        """``request``, with a refusal raised as HandoverError."""
        reply, received = self.request(message, fds)
        if not reply.get("ok"):
            _close_all(received)
            error = reply.get("error") or {}
            raise HandoverError(str(error.get("code")), str(error.get("message")))
        return reply, received

    def register(self, vm: str) -> None:
        self.call({"op": "register", "vm": vm})

    def unregister(self, vm: str) -> list[str]:
        reply, _ = self.call({"op": "unregister", "vm": vm})
        return list(reply["released"])

    def hand_over(self, vm: str, device: str, kind: str, fd: int) -> str:
        """Lend ``fd`` (it stays open here too); returns the handle plans name."""
        reply, _ = self.call({"op": "hand_over", "vm": vm, "device": device, "kind": kind}, [fd])
        return str(reply["handle"])

    def take_back(self, handle: str) -> int:
        """The daemon's copy of ``handle``'s descriptor, now the caller's to close."""
        _, received = self.call({"op": "take_back", "handle": handle})
        if len(received) != 1:
            _close_all(received)
            raise HandoverError("bad_reply", f"take_back returned {len(received)} descriptors")
        return received[0]

    def list(self) -> dict[str, Any]:
        reply, _ = self.call({"op": "list"})
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HandoverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
