"""Device backends and the registry plans name them by.

``BACKENDS`` maps each ``backend = "..."`` a plan may use to the one
:class:`Backend` instance that validates its parameters and creates its
devices.  The registry is read-only; callers that want another backend (a
test's own double, say) inject it instead of registering it globally.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from orchestrator.backends.base import Backend, Device, PrecopyInfo
from orchestrator.backends.simulated import SimulatedBackend
from orchestrator.errors import PlanError

__all__ = ["BACKENDS", "Backend", "Device", "PrecopyInfo", "get_backend"]

BACKENDS: Mapping[str, Backend] = MappingProxyType(
    {backend.name: backend for backend in (SimulatedBackend(),)}
)


def get_backend(name: str) -> Backend:
    """The backend a plan calls ``name``; a PlanError listing the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        available = ", ".join(sorted(BACKENDS))
        raise PlanError(f"unknown backend {name!r} (available: {available})") from None
