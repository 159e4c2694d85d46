"""The parameters of a simulated device: its plan table, validated.

Invariants: a :class:`SimulatedParams` is frozen and valid once built (sizes
positive and bounded, the page size a power of two, rates finite, a fault
at an arc at one of the device's own arcs); the state size is whole 8-byte
words (:attr:`SimulatedParams.state_bytes`), and the capabilities follow
from the ``p2p`` and ``pre_copy`` flags alone.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from orchestrator.backends.simulated.faults import FaultSpec, arc_names
from orchestrator.compat import CAPABILITIES_FIELD, FieldValue, Identity, capability_names
from orchestrator.states import Capabilities, MigrationFlags, arcs

MIB = 1 << 20
KIB = 1 << 10


class SimulatedParams(BaseModel):
    """The ``source`` or ``destination`` table of a ``backend = "simulated"`` device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_mib: float = Field(
        default=1.0,
        gt=0,
        le=4096,
        allow_inf_nan=False,
        description="Size of the device state in MiB (rounded to whole 8-byte words).",
    )
    page_kib: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="Page size in KiB, a power of two: the unit of dirtying and of transfer.",
    )
    dirty_mib_s: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="MiB per second of pages the running device rewrites (0: never).",
    )
    transition_ms: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Latency of each state arc (and of a reset), in milliseconds.",
    )
    drain_mib_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Rate, in MiB/s, at which the device produces (read) or consumes (write) "
        "stream bytes; unset: unlimited.",
    )
    p2p: bool = Field(default=True, description="The device has the P2P (NDMA) states.")
    pre_copy: bool = Field(default=True, description="The device has the PRE_COPY states.")
    precopy_reinit: bool = Field(
        default=True,
        description="The device has the opt-in pre-copy information feature (its second "
        "version), by which it may report new initial data mid pre-copy; false: it lacks it "
        "(an older kernel or driver), as its capabilities then say.",
    )
    reinit_mib: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Source: MiB of new initial data the device reports once mid pre-copy (its "
        "first pages, sent again as initial data); 0: never.  Needs pre_copy and precopy_reinit.",
    )
    reinit_after: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="With reinit_mib: the pre-copy information query, counting those that find "
        "the initial data drained, that reports the new initial data (1: the first; the "
        "engine asks twice a round, as the round begins and as it ends).",
    )
    seed: int = Field(default=0, description="Seed of the initial content and of the dirtying.")
    model: str = Field(
        default="sim",
        min_length=1,
        max_length=128,
        description="The device's model, part of its identity (a destination of another model "
        "refuses the migration unless accepted).",
    )
    firmware: str = Field(
        default="1.0",
        min_length=1,
        max_length=128,
        description="The device's firmware version, part of its identity.",
    )
    fault: FaultSpec | None = Field(default=None, description="A fault to inject, if any.")
    discard: bool = Field(
        default=False,
        description="Destination only: the device loads its stream and keeps none of it (no "
        "content, no file, no digest), at drain_mib_s; what the daemon holds meanwhile is "
        "its own.",
    )

    @field_validator("page_kib")
    @classmethod
    def _page_power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"page_kib must be a power of two (1, 2, 4, ..., 1024), not {value}")
        return value

    @field_validator("fault")
    @classmethod
    def _fault_arc_is_the_devices(
        cls, fault: FaultSpec | None, info: ValidationInfo
    ) -> FaultSpec | None:
        # An arc this device does not have would never fire: a test would pass
        # for want of its fault.  (p2p and pre_copy come first, so they are known.)
        if fault is None or fault.arc_from is None or fault.state is None:
            return fault
        p2p, pre_copy = info.data.get("p2p"), info.data.get("pre_copy")
        if p2p is None or pre_copy is None:
            return fault  # their own errors are reported
        graph = arcs(_flags(p2p=p2p, pre_copy=pre_copy))
        if fault.state in graph.get(fault.arc_from, frozenset()):
            return fault
        raise ValueError(
            f"fault at {fault.at!r}: not an arc of this device (p2p = {str(p2p).lower()}, "
            f"pre_copy = {str(pre_copy).lower()}), whose arcs are {', '.join(arc_names(graph))}"
        )

    @field_validator("reinit_mib")
    @classmethod
    def _reinit_needs_the_feature(cls, value: float, info: ValidationInfo) -> float:
        # A device that could never report it would make a test pass for want of it.
        if not value:
            return value
        if info.data.get("pre_copy") is False:
            raise ValueError("reinit_mib needs pre_copy = true: new initial data is a pre-copy's")
        if info.data.get("precopy_reinit") is False:
            raise ValueError(
                "reinit_mib needs precopy_reinit = true: a device without the pre-copy "
                "information's second version cannot report new initial data"
            )
        state_mib = info.data.get("state_mib")
        if state_mib is not None and value > state_mib:
            raise ValueError(f"reinit_mib ({value:g}) exceeds the state ({state_mib:g} MiB)")
        return value

    @property
    def reinit_bytes(self) -> int:
        """The new initial data ``reinit_mib`` asks for, in bytes (0: none)."""
        return round(self.reinit_mib * MIB)

    @property
    def state_bytes(self) -> int:
        """The state size in bytes: ``state_mib`` rounded to whole 8-byte words."""
        return max(8, round(self.state_mib * MIB / 8) * 8)

    @property
    def page_bytes(self) -> int:
        return self.page_kib * KIB

    @property
    def capabilities(self) -> Capabilities:
        flags = _flags(p2p=self.p2p, pre_copy=self.pre_copy)
        reinit = self.precopy_reinit and self.pre_copy
        return Capabilities(flags, stop_copy_size=True, dirty_logging=False, precopy_reinit=reinit)

    @property
    def identity(self) -> Identity:
        """What a simulated device is: its model, firmware and capabilities."""
        fields: dict[str, FieldValue] = {
            "model": self.model,
            "firmware": self.firmware,
            CAPABILITIES_FIELD: capability_names(self.capabilities),
        }
        return Identity("simulated", self.model, fields)


def _flags(*, p2p: bool, pre_copy: bool) -> MigrationFlags:
    flags = MigrationFlags.STOP_COPY
    if p2p:
        flags |= MigrationFlags.P2P
    if pre_copy:
        flags |= MigrationFlags.PRE_COPY
    return flags
