"""The one small interface every device backend implements.

A backend drives one device endpoint: the source device of a migration or
its destination device.  The interface mirrors the kernel's VFIO migration
v2 uAPI, because that is the richest of the device models we drive; other
backends (vhost-vdpa) map their own operations onto it.

Invariants a backend keeps:

* ``set_state`` performs exactly one arc of the state model
  (``orchestrator.states``).  Multi-step requests are walked by the runner,
  one arc at a time, so every transition is traced, timed and
  fault-injectable.  A failed arc leaves the device in its old state or in
  ERROR; ``get_state`` tells which.
* ``read`` returns the next bytes of the device's migration stream.  An
  empty result means "no more data now": in a PRE_COPY state that is the
  temporary end of the currently available data (``-ENOMSG`` in the uAPI,
  ``0`` from some drivers); in STOP_COPY it is the end of the stream.
* ``write`` feeds the stream to a device in RESUMING, in order.
* ``bulk_reader`` / ``bulk_writer``, where a backend offers them, are the
  same stream's blocking side, for the data channel's I/O threads to read
  and load the device without trio (never called from trio's thread).  They
  keep every rule of ``read`` and ``write``; a call may block, and a thread
  stuck in one is abandoned by the runner at its deadline.
* Every failure is a :class:`orchestrator.errors.DeviceError`; a backend
  translates its errno at this boundary and nowhere else.
* Backends never sleep on a deadline of their own: the runner puts every
  call under one.  Blocking system calls run in worker threads so that many
  devices proceed in parallel.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from orchestrator.compat import Identity
from orchestrator.errors import DeviceError, Problem
from orchestrator.states import Capabilities, DeviceState, Side

#: A chunk of a migration stream as a device's ``write`` gets it: lent for the call.
StreamChunk = bytes | bytearray | memoryview

if TYPE_CHECKING:
    from orchestrator.handover import HandleRegistry
    from orchestrator.transport.streams import BlockingReader, BlockingWriter


@dataclass(frozen=True)
class PrecopyInfo:
    """What VFIO_MIG_GET_PRECOPY_INFO reports.

    ``initial_bytes``: data of the initial pass not yet read; the device wants
    it drained before the switchover.  ``dirty_bytes``: an estimate of data
    that changed since it was read and will have to be sent again.
    ``reinit``: the device says new initial data appeared since its last report
    (only a device whose capabilities have ``precopy_reinit`` says so); its
    ``initial_bytes`` count that new data.
    """

    initial_bytes: int
    dirty_bytes: int
    reinit: bool = False


class Device(abc.ABC):
    """One device endpoint, source or destination, of one backend."""

    #: The backend's name as plans spell it.
    backend: ClassVar[str]

    def __init__(self, name: str, side: Side) -> None:
        self.name = name
        self.side = side

    def _device_error(
        self, operation: str, message: str, err: int, target: DeviceState | None = None
    ) -> DeviceError:
        """A ``DeviceError`` naming this device, the operation, its target and the errno."""
        return DeviceError(
            message,
            device=self.name,
            operation=operation,
            target=None if target is None else target.name,
            errno=err,
        )

    @abc.abstractmethod
    async def open(self) -> Capabilities:
        """Open the device and report its migration capabilities."""

    @abc.abstractmethod
    async def get_state(self) -> DeviceState:
        """The device's current migration state, as the device reports it."""

    @abc.abstractmethod
    async def set_state(self, target: DeviceState) -> None:
        """Take one arc of the state model to ``target``."""

    @abc.abstractmethod
    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of the migration stream; ``b""``: nothing more now."""

    @abc.abstractmethod
    async def write(self, data: StreamChunk) -> None:
        """Load the next bytes of the migration stream (RESUMING only).

        ``data`` is lent for the call: it may be a view of a buffer the data
        channel reuses once ``write`` returns, so a device copies what it keeps.
        """

    def bulk_reader(self) -> BlockingReader | None:
        """The blocking side of ``read``, for an I/O thread (None: not offered; the
        runner then reads through ``read``).  Asked at each round, so a backend may
        offer it only while nothing it must do on trio's thread is due."""
        return None

    def bulk_writer(self) -> BlockingWriter | None:
        """The blocking side of ``write``, for an I/O thread (None: not offered)."""
        return None

    @abc.abstractmethod
    async def precopy_info(self) -> PrecopyInfo:
        """Initial and dirty bytes still to send (PRE_COPY states only)."""

    @abc.abstractmethod
    async def stop_copy_size(self) -> int:
        """Estimated bytes the device would produce in STOP_COPY from now."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Reset the device: it leaves ERROR and reads RUNNING, its state is lost."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the device.  Safe to call more than once."""

    async def device_identity(self) -> Identity | None:
        """What must match for a migration stream to load (``orchestrator.compat``),
        read once the device is open; None: the backend reports none."""
        return None

    async def state_digest(self) -> str | None:
        """A digest of the device's internal state, where the backend can tell.

        The simulated backend can; real hardware cannot, and returns None.
        """
        return None

    def declared_arc_s(self, source: DeviceState, target: DeviceState) -> float | None:
        """How long the arc ``source -> target`` takes, where the backend knows it
        without taking it (None: it does not).  The downtime model uses it for the
        arcs a migration has not walked yet (the stop, the destination's settle)."""
        return None

    def declared_rate_bytes_s(self) -> float | None:
        """The rate at which the device produces its stream, where the backend knows it
        (None: no limit of its own is known)."""
        return None

    def model_key(self) -> str | None:
        """What kind of device this is, for the arc history a host keeps across
        migrations (devices of one key take their arcs alike); None: none kept.
        Known once the device is open."""
        return None

    def declared_dirty_bytes(self, seconds: float) -> int | None:
        """How many stop-copy bytes this running device adds in ``seconds`` more,
        where the backend knows how it dirties its state (None: the model
        measures a rate over the pre-copy rounds instead)."""
        return None

    def declared_read_bytes(self, max_bytes: int) -> int:
        """The most one ``read(max_bytes)`` returns (the downtime model counts the
        last piece's load at the destination after its read); ``max_bytes`` unless
        the backend reads in smaller pieces of its own."""
        return max_bytes

    def timings(self) -> Mapping[str, float]:
        """Where this endpoint's backend spent its time, in ms, by step (for the report).

        Backends whose own steps dominate the downtime say so here (vhost_vdpa:
        suspend, state_read, restore, start, resume); the default is nothing.
        """
        return {}


class Backend(abc.ABC):
    """How plans name, validate and create the devices of one backend."""

    #: The name plans use in ``backend = "..."``.
    name: ClassVar[str]
    #: The pydantic model of a ``source`` or ``destination`` table.
    params_model: ClassVar[type[BaseModel]]
    #: The fields of its devices' identities (``Device.device_identity``): what a plan's
    #: ``accept_differences`` and a ``[[compat.rules]]`` entry may name.
    identity_fields: ClassVar[tuple[str, ...]] = ()

    def present(self) -> bool:
        """Whether this host could have devices of this backend (its kernel
        interface exists); the metrics create their series for those only."""
        return True

    def destination_defaults(self, source: BaseModel) -> Mapping[str, Any]:
        """Fields the destination table inherits from the source when it omits them."""
        return {}

    def static_capabilities(self, params: BaseModel) -> Capabilities | None:
        """Capabilities known without opening the device (None: ask the device)."""
        return None

    def check_pair(self, source: BaseModel, destination: BaseModel) -> list[Problem]:
        """Problems that make this source/destination pair unable to migrate."""
        return []

    def device_keys(self, name: str, source: BaseModel, destination: BaseModel) -> list[str]:
        """The names the service locks this device by while a migration uses it.

        Two plans whose devices share a key cannot run at once (the second is
        refused as busy).  The default is the plan's own name for the device,
        ``"<backend>:<name>"``, which suits devices that exist only by that name
        (simulated ones).  A backend of real devices returns their host-wide
        identities instead (a sysfs path, a handle), so that one device named
        differently by two plans is still one device.
        """
        return [f"{self.name}:{name}"]

    def with_handles(self, handles: HandleRegistry) -> Backend:
        """This backend, able to open devices VMMs handed over to ``handles``.

        The default is the backend itself: it takes no handed-over devices.
        A backend whose parameters accept ``handle`` returns a copy bound to the
        registry (see ``orchestrator.backends.handles``).
        """
        return self

    @abc.abstractmethod
    def create(self, name: str, side: Side, params: BaseModel) -> Device:
        """A device object for one endpoint; nothing is opened yet."""
