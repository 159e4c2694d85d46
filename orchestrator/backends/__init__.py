"""Device backends and the registry plans name them by.

``BACKENDS`` maps each ``backend = "..."`` a plan may use to the one
:class:`Backend` instance that validates its parameters and creates its
devices.  The registry is read-only; callers that want another backend (a
test's own double, say) inject it instead of registering it globally:
``resolve(plan, backends)`` takes any such mapping, and
:func:`backends_for` builds the daemon's, whose simulated devices live in
files under its state directory and so survive a crash of the daemon.

``vfio`` drives real devices through the kernel's VFIO migration uAPI
(``orchestrator.backends.vfio``); it has no state of its own to keep.
``vhost_vdpa`` drives vDPA devices a VMM owns, through the descriptor it
hands over and its owner channel (``orchestrator.backends.vhost_vdpa``).  The
daemon's registry is also bound to its ``HandleRegistry``, so that plans may
name devices a VMM handed over by handle (``orchestrator.backends.handles``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from orchestrator.backends.base import Backend, Device, PrecopyInfo
from orchestrator.backends.simulated import SimulatedBackend
from orchestrator.backends.vfio import VfioBackend
from orchestrator.backends.vhost_vdpa import VhostVdpaBackend
from orchestrator.errors import PlanError
from orchestrator.handover import HandleRegistry

__all__ = ["BACKENDS", "Backend", "Device", "PrecopyInfo", "backends_for", "get_backend"]

BACKENDS: Mapping[str, Backend] = MappingProxyType(
    {backend.name: backend for backend in (SimulatedBackend(), VfioBackend(), VhostVdpaBackend())}
)


def backends_for(
    state_dir: Path | None, *, handles: HandleRegistry | None = None
) -> Mapping[str, Backend]:
    """The registry for a process whose state lives in ``state_dir``.

    ``None`` and no ``handles`` is :data:`BACKENDS` itself (in-memory simulated
    devices).  With a directory, the simulated backend keeps each device in a
    file under ``state_dir/simulated/``, as hardware outlives the process
    driving it.  With ``handles`` (the daemon's registry of handed-over
    devices), every backend that takes devices by handle opens them from it
    (``Backend.with_handles``).
    """
    if state_dir is None and handles is None:
        return BACKENDS
    registry = dict(BACKENDS)
    if state_dir is not None:
        registry[SimulatedBackend.name] = SimulatedBackend(Path(state_dir))
    if handles is not None:
        registry = {name: backend.with_handles(handles) for name, backend in registry.items()}
    return MappingProxyType(registry)


def get_backend(name: str, backends: Mapping[str, Backend] | None = None) -> Backend:
    """The backend a plan calls ``name`` in ``backends`` (default: :data:`BACKENDS`);
    a PlanError listing the known ones otherwise."""
    registry = BACKENDS if backends is None else backends
    try:
        return registry[name]
    except KeyError:
        available = ", ".join(sorted(registry))
        raise PlanError(f"unknown backend {name!r} (available: {available})") from None
