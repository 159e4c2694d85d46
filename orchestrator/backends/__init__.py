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
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from orchestrator.backends.base import Backend, Device, PrecopyInfo
from orchestrator.backends.simulated import SimulatedBackend
from orchestrator.backends.vfio import VfioBackend
from orchestrator.errors import PlanError

__all__ = ["BACKENDS", "Backend", "Device", "PrecopyInfo", "backends_for", "get_backend"]

BACKENDS: Mapping[str, Backend] = MappingProxyType(
    {backend.name: backend for backend in (SimulatedBackend(), VfioBackend())}
)


def backends_for(state_dir: Path | None) -> Mapping[str, Backend]:
    """The registry for a process whose state lives in ``state_dir``.

    ``None`` is :data:`BACKENDS` itself (in-memory simulated devices).  With a
    directory, the simulated backend keeps each device in a file under
    ``state_dir/simulated/``, as hardware outlives the process driving it.
    """
    if state_dir is None:
        return BACKENDS
    return MappingProxyType(
        {
            backend.name: backend
            for backend in (SimulatedBackend(Path(state_dir)), BACKENDS[VfioBackend.name])
        }
    )


def get_backend(name: str, backends: Mapping[str, Backend] | None = None) -> Backend:
    """The backend a plan calls ``name`` in ``backends`` (default: :data:`BACKENDS`);
    a PlanError listing the known ones otherwise."""
    registry = BACKENDS if backends is None else backends
    try:
        return registry[name]
    except KeyError:
        available = ", ".join(sorted(registry))
        raise PlanError(f"unknown backend {name!r} (available: {available})") from None
