"""Fault injection for simulated devices: what a fault is, and where it fires.

``fault = {at = ..., kind = ..., offset = ..., once = ..., delay_ms = ...}``:

* ``at = "<STATE>"`` without ``offset``: fires when ``set_state`` is asked to
  enter that state, by any arc (after the arc was validated and its latency
  slept).  ``error``: DeviceError, state unchanged.  ``error_state``:
  DeviceError and the device is now in ERROR.  ``hang``: never returns (the
  runner's deadline cancels it; the state is unchanged).  ``corrupt``: the
  arc succeeds and the next stream byte the device produces (source) or
  consumes (destination) is flipped (XOR 0xFF).  ``delay``: the arc takes
  ``delay_ms`` longer (its latency and the delay are one sleep), then
  succeeds.
* ``at = "<FROM>-><TO>"``, an arc (case-insensitive, spaces allowed around
  the arrow): the same, but only when ``set_state(TO)`` is asked while the
  device is in ``FROM``; another arc into ``TO`` does not fire it.  So a
  destination's post-load arcs (``RESUMING->STOP``, ``STOP->RUNNING_P2P``)
  can be struck, where ``at = "STOP"`` or ``"RUNNING_P2P"`` fires on the walk
  to RESUMING.  The arc must be one of :data:`FAULT_ARCS` (an arc of the
  state model for some capability set; never into ERROR), and one of the
  device's own (:class:`~.params.SimulatedParams` checks).
* ``at = "stream"``, ``offset = N``: fires on the ``read`` (source) or
  ``write`` (destination) whose byte range covers stream byte ``N``, in every
  stream.  ``error``/``error_state``/``hang`` as above; ``corrupt`` flips
  byte ``N``.
* ``at = "<STATE>"`` or ``"<FROM>-><TO>"`` with ``offset = N``: taking the
  arc arms the ``at = "stream"`` behaviour for byte ``N`` (of the current or a
  later stream).
* ``kind = "delay"`` needs ``delay_ms`` (> 0), which no other kind takes, and
  a state or an arc (not the stream, no ``offset``).  The delay is slept with
  the device's latency (:func:`~orchestrator.backends.precise_sleep.sleep`):
  a caller's deadline cancels it (the arc then did not happen, as with any
  cancelled latency), and under trio's ``MockClock`` it is virtual.
* ``once = true`` (the default) fires once and clears; ``once = false`` fires
  every time (each time the arc is taken or the state entered, or each call
  covering byte ``N``).  A fault at a state or an arc fires (and a ``once``
  one is spent) at a fixed point of ``set_state``: a ``delay`` as the arc's
  sleep begins, any other kind once the latency is slept.  So a ``hang`` or
  a ``delay`` the caller cancels is spent; a fault whose arc was cancelled
  during its latency has not fired.

``once`` is per device object, that is per process: faults are behaviour,
not state, so a persistent device's file does not record them
(:mod:`.statefile`).  A device reopened after a restart takes its fault
from the plan again, and a ``once`` fault that fired before the restart
fires again after it.

Invariants: a :class:`FaultSpec` names a state a device can be asked to
enter (never ERROR, which a device only falls into), an arc of the state
model, or the stream with an offset; it is validated once, when the plan
is, and is frozen.  A device's :class:`_Faults` decides when its faults
fire; the device carries them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.backends.base import StreamChunk
from orchestrator.states import DeviceState, MigrationFlags, arcs

FaultKind = Literal["error", "error_state", "hang", "corrupt", "delay"]

#: States a fault can be injected at: every one a device can be asked to enter.
FAULT_STATES: tuple[str, ...] = tuple(s.name for s in DeviceState if s is not DeviceState.ERROR)

_ANY_CAPABILITIES = tuple(
    MigrationFlags.STOP_COPY | extra
    for extra in (
        MigrationFlags(0),
        MigrationFlags.P2P,
        MigrationFlags.PRE_COPY,
        MigrationFlags.P2P | MigrationFlags.PRE_COPY,
    )
)

_ARROW = "->"


def arc_name(start: DeviceState, end: DeviceState) -> str:
    """An arc as a fault's ``at`` spells it: ``"FROM->TO"``."""
    return f"{start.name}{_ARROW}{end.name}"


def arc_names(*graphs: Mapping[DeviceState, frozenset[DeviceState]]) -> tuple[str, ...]:
    """Every arc of these arc tables (:func:`orchestrator.states.arcs`), once, in the
    states' order, spelled as a fault's ``at`` spells it."""
    pairs = {(start, end) for graph in graphs for start, ends in graph.items() for end in ends}
    return tuple(arc_name(start, end) for start, end in sorted(pairs))


#: Arcs a fault can be injected at: every arc of the state model, for any capability
#: set (ERROR is never the end of one), as ``"FROM->TO"``.
FAULT_ARCS: tuple[str, ...] = arc_names(*(arcs(flags) for flags in _ANY_CAPABILITIES))


def _state_name(value: str, name: str, where: str) -> str:
    upper = name.strip().upper()
    if upper == DeviceState.ERROR.name:
        raise ValueError(
            f"a fault cannot be injected at {where}ERROR: a device only falls into ERROR "
            "(and only a reset leaves it); use kind = 'error_state' at the state or arc "
            "whose entry should fail"
        )
    if upper not in FAULT_STATES:
        raise ValueError(
            f"unknown fault point {value!r}: expected 'stream', a state ("
            f"{', '.join(FAULT_STATES)}) or an arc 'FROM->TO'"
        )
    return upper


class FaultSpec(BaseModel):
    """One injected fault: where it fires, what it does, how often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: str = Field(
        description='A device state the fault fires on entering (for example "STOP_COPY"), '
        'an arc it fires on taking (for example "RESUMING->STOP"; case-insensitive), or '
        '"stream" to fire at the stream byte `offset`.'
    )
    kind: FaultKind = Field(
        description="error: the call fails, state unchanged; error_state: the call fails and "
        "the device is in ERROR; hang: the call never returns; corrupt: one stream byte is "
        "flipped; delay: the arc takes `delay_ms` longer, then succeeds."
    )
    offset: int | None = Field(
        default=None,
        ge=0,
        description='Stream byte offset the fault fires at; required with at = "stream". '
        "With a state or an arc, taking the arc arms the fault for this byte.",
    )
    once: bool = Field(
        default=True,
        description="Fire once, then clear; false fires every time the trigger is met.",
    )
    delay_ms: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        validate_default=True,
        description="How much longer, in milliseconds, the arc takes; required with kind = "
        '"delay", and only with it.',
    )

    @field_validator("at")
    @classmethod
    def _normalise_at(cls, value: str) -> str:
        name = value.strip()
        if name.lower() == "stream":
            return "stream"
        if _ARROW not in name:
            return _state_name(value, name, "")
        start_name, _, end_name = name.partition(_ARROW)
        start = DeviceState[_state_name(value, start_name, "an arc from ")]
        end = DeviceState[_state_name(value, end_name, "an arc into ")]
        arc = arc_name(start, end)
        if arc not in FAULT_ARCS:
            raise ValueError(
                f"{value!r} is not one arc of the state model: expected one of "
                f"{', '.join(FAULT_ARCS)}"
            )
        return arc

    @field_validator("delay_ms")
    @classmethod
    def _delay_only_for_delay(cls, value: float | None, info: ValidationInfo) -> float | None:
        kind = info.data.get("kind")
        if kind == "delay" and value is None:
            raise ValueError(
                "kind = 'delay' needs delay_ms = how many milliseconds longer the arc takes"
            )
        if kind is not None and kind != "delay" and value is not None:
            raise ValueError(f"delay_ms applies only to kind = 'delay', not kind = {kind!r}")
        return value

    @model_validator(mode="after")
    def _where_fits_kind(self) -> FaultSpec:
        if self.kind == "delay" and (self.at == "stream" or self.offset is not None):
            raise ValueError(
                "kind = 'delay' lengthens an arc (or a state's entry): it cannot be at "
                "'stream' and takes no offset"
            )
        if self.at == "stream" and self.offset is None:
            raise ValueError('a fault at "stream" needs offset = the stream byte it fires at')
        return self

    @property
    def state(self) -> DeviceState | None:
        """The state whose entry triggers the fault (an arc's end); None for a stream fault."""
        if self.at == "stream":
            return None
        return DeviceState[self.at.rpartition(_ARROW)[2]]

    @property
    def arc_from(self) -> DeviceState | None:
        """The state an arc fault's arc leaves; None for a state or stream fault."""
        start, arrow, _ = self.at.partition(_ARROW)
        return DeviceState[start] if arrow else None


@dataclass(slots=True)
class _ArmedFault:
    kind: FaultKind
    offset: int | None  # None: the next stream byte


class _Faults:
    """A device's faults: the configured one still to fire, and the one an arc armed.

    Invariants: a ``once`` fault is cleared as it fires, so it fires at most
    once; an arc fault fires only on its arc, a state fault on every arc into
    its state; a fault at a state or an arc with an offset, or a corruption
    there, never fails the arc, it arms the stream instead; a delay never
    fails the arc, it lengthens it; an armed fault fires once, on the first
    call whose stream bytes cover its byte.
    """

    __slots__ = ("_delay_s", "_from", "_to", "armed", "configured")

    def __init__(self, configured: FaultSpec | None) -> None:
        #: The configured fault still to fire (None once a ``once`` fault fired).
        self.configured = configured
        #: What taking an arc armed for the stream (cleared by a reset).
        self.armed: _ArmedFault | None = None
        # Parsed once: the arc checks are on every set_state of a faulty device.
        self._to = None if configured is None else configured.state
        self._from = None if configured is None else configured.arc_from
        delay_ms = None if configured is None else configured.delay_ms
        self._delay_s = 0.0 if delay_ms is None else delay_ms / 1000

    @property
    def quiet(self) -> bool:
        """No fault is configured or armed: the hot paths skip the fault checks."""
        return self.configured is None and self.armed is None

    def _on(self, current: DeviceState, target: DeviceState) -> FaultSpec | None:
        fault = self.configured
        if fault is None or self._to is not target:
            return None
        if self._from is not None and self._from is not current:
            return None
        return fault

    def delay_s(self, current: DeviceState, target: DeviceState) -> float:
        """Seconds a delay fault adds to the arc ``current -> target`` now (0: none).

        Only looks: :meth:`entering` is what spends the fault.
        """
        fault = self._on(current, target)
        return self._delay_s if fault is not None and fault.kind == "delay" else 0.0

    def entering(self, current: DeviceState, target: DeviceState) -> FaultKind | None:
        """The fault that fails the arc ``current -> target`` now, if any.

        A matching fault fires here (a ``once`` one clears): a delay returns
        None (the caller sleeps it, from :meth:`delay_s`), as does a fault
        that arms the stream.
        """
        fault = self._on(current, target)
        if fault is None:
            return None
        if fault.once:
            self.configured = None
        if fault.kind == "delay":
            return None
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
