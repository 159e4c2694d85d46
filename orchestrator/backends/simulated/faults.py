"""Fault injection for simulated devices: what a fault is, and where it fires.

``fault = {at = ..., kind = ..., offset = ..., once = ...}``:

* ``at = "<STATE>"`` without ``offset``: fires when ``set_state`` is asked to
  enter that state (after the arc was validated and its latency slept).
  ``error``: DeviceError, state unchanged.  ``error_state``: DeviceError and
  the device is now in ERROR.  ``hang``: never returns (the runner's deadline
  cancels it; the state is unchanged).  ``corrupt``: the arc succeeds and the
  next stream byte the device produces (source) or consumes (destination)
  is flipped (XOR 0xFF).
* ``at = "stream"``, ``offset = N``: fires on the ``read`` (source) or
  ``write`` (destination) whose byte range covers stream byte ``N``, in every
  stream.  ``error``/``error_state``/``hang`` as above; ``corrupt`` flips
  byte ``N``.
* ``at = "<STATE>"`` with ``offset = N``: entering the state arms the
  ``at = "stream"`` behaviour for byte ``N`` (of the current or a later
  stream).
* ``once = true`` (the default) fires once and clears; ``once = false`` fires
  every time (each entry to the state, or each call covering byte ``N``).

Invariants: a :class:`FaultSpec` names a state a device can be asked to
enter (never ERROR, which a device only falls into) or the stream with an
offset; it is validated once, when the plan is, and is frozen.  A device's
:class:`_Faults` decides when its faults fire; the device carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.backends.base import StreamChunk
from orchestrator.states import DeviceState

FaultKind = Literal["error", "error_state", "hang", "corrupt"]

#: States a fault can be injected at: every one a device can be asked to enter.
FAULT_STATES: tuple[str, ...] = tuple(s.name for s in DeviceState if s is not DeviceState.ERROR)


class FaultSpec(BaseModel):
    """One injected fault: where it fires, what it does, how often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: str = Field(
        description='A device state the fault fires on entering (for example "STOP_COPY"; '
        'case-insensitive), or "stream" to fire at the stream byte `offset`.'
    )
    kind: FaultKind = Field(
        description="error: the call fails, state unchanged; error_state: the call fails and "
        "the device is in ERROR; hang: the call never returns; corrupt: one stream byte is "
        "flipped."
    )
    offset: int | None = Field(
        default=None,
        ge=0,
        description='Stream byte offset the fault fires at; required with at = "stream". '
        "With a state, entering the state arms the fault for this byte.",
    )
    once: bool = Field(
        default=True,
        description="Fire once, then clear; false fires every time the trigger is met.",
    )

    @field_validator("at")
    @classmethod
    def _normalise_at(cls, value: str) -> str:
        name = value.strip()
        if name.lower() == "stream":
            return "stream"
        upper = name.upper()
        if upper == DeviceState.ERROR.name:
            raise ValueError(
                "a fault cannot be injected at ERROR: a device only falls into ERROR; "
                "use kind = 'error_state' at the state whose entry should fail"
            )
        if upper not in FAULT_STATES:
            raise ValueError(
                f"unknown fault point {value!r}: expected 'stream' or one of "
                f"{', '.join(FAULT_STATES)}"
            )
        return upper

    @model_validator(mode="after")
    def _stream_needs_offset(self) -> FaultSpec:
        if self.at == "stream" and self.offset is None:
            raise ValueError('a fault at "stream" needs offset = the stream byte it fires at')
        return self

    @property
    def state(self) -> DeviceState | None:
        """The state whose entry triggers the fault; None for a stream fault."""
        return None if self.at == "stream" else DeviceState[self.at]


@dataclass(slots=True)
class _ArmedFault:
    kind: FaultKind
    offset: int | None  # None: the next stream byte


class _Faults:
    """A device's faults: the configured one still to fire, and the one a state armed.

    Invariants: a ``once`` fault is cleared as it fires, so it fires at most
    once; a fault at a state with an offset, or a corruption at a state,
    never fails the arc into it, it arms the stream instead; an armed fault
    fires once, on the first call whose stream bytes cover its byte.
    """

    __slots__ = ("armed", "configured")

    def __init__(self, configured: FaultSpec | None) -> None:
        #: The configured fault still to fire (None once a ``once`` fault fired).
        self.configured = configured
        #: What entering a state armed for the stream (cleared by a reset).
        self.armed: _ArmedFault | None = None

    @property
    def quiet(self) -> bool:
        """No fault is configured or armed: the hot paths skip the fault checks."""
        return self.configured is None and self.armed is None

    def entering(self, target: DeviceState) -> FaultKind | None:
        """The fault that fails the arc into ``target`` now, if any."""
        fault = self.configured
        if fault is None or fault.state is not target:
            return None
        if fault.once:
            self.configured = None
        if fault.offset is None and fault.kind != "corrupt":
            return fault.kind
        self.armed = _ArmedFault(fault.kind, fault.offset)
        return None

    def on_stream(self, start: int, length: int) -> tuple[FaultKind, int] | None:
        """The fault, if any, that fires on a call moving stream bytes [start, start+length),
        and the stream offset it fires at."""
        if not length:
            return None
        armed = self.armed
        if armed is not None:
            offset = start if armed.offset is None else armed.offset
            if start <= offset < start + length:
                self.armed = None
                return armed.kind, offset
        fault = self.configured
        if (
            fault is not None
            and fault.offset is not None
            and fault.at == "stream"
            and start <= fault.offset < start + length
        ):
            if fault.once:
                self.configured = None
            return fault.kind, fault.offset
        return None


def _flip(data: StreamChunk, index: int) -> bytes:
    corrupted = bytearray(data)
    corrupted[index] ^= 0xFF
    return bytes(corrupted)
