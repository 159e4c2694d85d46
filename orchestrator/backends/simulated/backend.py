"""The simulated backend: where simulated devices come from, and what a pair must share.

``backend = "simulated"`` in a plan.  Without a ``state_dir`` its devices
live in memory and die with their objects; with one, each device endpoint
lives in its own file (:mod:`.statefile`) and survives its process.

Invariants: a destination inherits its source's size, page size,
capabilities, seed, model and firmware unless its table says otherwise; a pair whose stream
could not load (sizes or pages differ), or a persistent device whose seed
its file cannot record, is refused before any device is opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from pydantic import BaseModel

from orchestrator.backends.base import Backend
from orchestrator.backends.simulated.device import SimulatedDevice
from orchestrator.backends.simulated.discard import DiscardDevice
from orchestrator.backends.simulated.params import SimulatedParams
from orchestrator.backends.simulated.statefile import seed_fits_file
from orchestrator.errors import Problem
from orchestrator.states import Capabilities, Side

#: What a destination table inherits from its source when it omits them.
_INHERITED = ("state_mib", "page_kib", "p2p", "pre_copy", "seed", "model", "firmware")


def _params(params: BaseModel) -> SimulatedParams:
    if not isinstance(params, SimulatedParams):
        raise TypeError(f"expected SimulatedParams, got {type(params).__name__}")
    return params


class StoredDevice(NamedTuple):
    """A persistent simulated device endpoint: its file and the file's size."""

    name: str
    side: Side
    path: Path
    bytes: int


class SimulatedBackend(Backend):
    """``backend = "simulated"``: devices for tests, examples and benchmarks.

    Without a ``state_dir`` its devices live in memory and die with their
    objects.  With one, each device endpoint lives in its own file,
    ``state_dir/simulated/<side>/<name>.sim``, and survives its process: the
    same name on the same side is the same device, across plans and restarts.
    """

    name: ClassVar[str] = "simulated"
    params_model: ClassVar[type[BaseModel]] = SimulatedParams
    identity_fields: ClassVar[tuple[str, ...]] = ("firmware", "migration", "model")

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir

    def __repr__(self) -> str:
        where = "in memory" if self.state_dir is None else f"in {self.state_dir}"
        return f"<SimulatedBackend {where}>"

    def device_file(self, name: str, side: Side) -> Path:
        """Where a persistent device lives (only with a ``state_dir``)."""
        if self.state_dir is None:
            raise ValueError("an in-memory simulated backend keeps no device files")
        if not name or name.startswith(".") or "/" in name or "\0" in name:
            raise ValueError(f"device name {name!r} cannot name a file")
        return self.state_dir / "simulated" / side.value / f"{name}.sim"

    def stored_devices(self) -> list[StoredDevice]:
        """The device files this backend keeps, by name then side (none in memory):
        what an operator sees of them (``GET /v1/devices``).  Reads directories only."""
        if self.state_dir is None:
            return []
        found = []
        for side in Side:
            folder = self.state_dir / "simulated" / side.value
            try:
                paths = sorted(folder.glob("*.sim"))
            except OSError:
                continue
            for path in paths:
                try:
                    size = path.stat().st_size
                except OSError:  # removed meanwhile
                    continue
                found.append(StoredDevice(path.stem, side, path, size))
        return sorted(found, key=lambda d: (d.name, d.side.value))

    def destination_defaults(self, source: BaseModel) -> Mapping[str, Any]:
        params = _params(source)
        return {field: getattr(params, field) for field in _INHERITED}

    def static_capabilities(self, params: BaseModel) -> Capabilities:
        return _params(params).capabilities

    def check_pair(self, source: BaseModel, destination: BaseModel) -> list[Problem]:
        src, dst = _params(source), _params(destination)
        problems = []
        if src.discard:
            problems.append(
                Problem("source.discard", "a discarding device loads only: it cannot be a source")
            )
        if src.state_bytes != dst.state_bytes:
            problems.append(
                Problem(
                    "destination.state_mib",
                    f"the destination holds {dst.state_mib} MiB of state, the source "
                    f"{src.state_mib} MiB: the stream could not load",
                )
            )
        if src.page_kib != dst.page_kib:
            problems.append(
                Problem(
                    "destination.page_kib",
                    f"the destination uses {dst.page_kib} KiB pages, the source "
                    f"{src.page_kib} KiB: the stream could not load",
                )
            )
        if self.state_dir is not None:
            for where, params in (("source", src), ("destination", dst)):
                if not seed_fits_file(params.seed):
                    problems.append(
                        Problem(
                            f"{where}.seed",
                            f"a persistent simulated device needs a seed in the signed 64-bit "
                            f"range, not {params.seed}",
                        )
                    )
        return problems

    def create(self, name: str, side: Side, params: BaseModel) -> SimulatedDevice | DiscardDevice:
        settings = _params(params)
        if settings.discard:
            return DiscardDevice(name, side, settings)
        state_file = None if self.state_dir is None else self.device_file(name, side)
        return SimulatedDevice(name, side, settings, state_file=state_file)
