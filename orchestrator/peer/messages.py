"""The messages of the commit protocol between two daemons, and their codec.

Every message is a frozen dataclass with an ``OP`` naming it on the wire.
``encode`` gives its JSON-ready form and ``decode`` the message back, or a
:class:`MalformedMessage` naming the op and the field that is wrong: a peer
never gets a dict through to the protocol machines (``protocol.py``).
``negotiate_version`` picks the protocol version two daemons speak.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

from orchestrator.errors import ProtocolViolation
from orchestrator.report import ErrorInfo, Outcome
from orchestrator.states import DeviceState

__all__ = [
    "IDENTITIES_VERSION",
    "MESSAGES",
    "ORDERED_VERSION",
    "PROTOCOL_VERSIONS",
    "Abort",
    "ArcReport",
    "Begin",
    "Budget",
    "Commit",
    "Completed",
    "DecisionAnswer",
    "DecisionQuery",
    "FinalOutcome",
    "InitialSent",
    "LoadFailed",
    "Loaded",
    "MalformedMessage",
    "Message",
    "OverBudget",
    "Refused",
    "RolledBack",
    "VcpusReport",
    "Vote",
    "decode",
    "encode",
    "negotiate_version",
]

#: The protocol versions this build speaks, oldest first.  A source offers
#: its range in the prepare call; the destination picks the newest both
#: speak, or refuses before anything changes.
#: Version 2 adds the strict budget's share (``Budget``, ``OverBudget``).
#: Version 3 adds each device's identity to the prepare answer (``identity``),
#: which the source compares before any device leaves RUNNING, and a destination
#: that runs a VM's ordered device (one without P2P among P2P peers) before its
#: peers leave their grace states.
PROTOCOL_VERSIONS: tuple[int, ...] = (1, 2, 3)
#: The first version whose prepare answer carries the devices' identities.
IDENTITIES_VERSION = 3
#: The first version whose destination keeps the ordered device's order.
ORDERED_VERSION = 3


class MalformedMessage(ProtocolViolation):
    """A message that does not decode: unknown op, missing or mistyped field."""


def negotiate_version(offered: tuple[int, int] | None, supported: tuple[int, ...]) -> int:
    """The newest version in both ``offered`` (low, high) and ``supported``.

    Raises ProtocolViolation naming both ranges when there is none: two
    daemons of a fleet mid-upgrade refuse each other before anything changes.
    """
    if offered is None:
        raise ProtocolViolation(
            "the source daemon offers no protocol version (it predates versioned "
            f"protocols); this daemon speaks versions {_span(supported)}: upgrade the source"
        )
    low, high = offered
    common = [v for v in supported if low <= v <= high]
    if not common:
        raise ProtocolViolation(
            f"no common protocol version: the source speaks {_span((low, high))}, "
            f"this daemon {_span(supported)}"
        )
    return max(common)


def _span(versions: tuple[int, ...]) -> str:
    low, high = min(versions), max(versions)
    return str(low) if low == high else f"{low} to {high}"


# --------------------------------------------------------------------------
# Messages: typed, with one codec for the wire (CONTROL frames and REST bodies)


@dataclass(frozen=True, slots=True)
class Message:
    """A message between the two daemons; ``OP`` names it on the wire, ``FROM`` says
    which side sends it (``either``: both)."""

    OP: ClassVar[str] = ""
    FROM: ClassVar[str] = "either"


# -- source to destination --


@dataclass(frozen=True, slots=True)
class Begin(Message):
    """The data channel is up: walk every device to RESUMING and load."""

    OP: ClassVar[str] = "begin"
    FROM: ClassVar[str] = "source"


@dataclass(frozen=True, slots=True)
class InitialSent(Message):
    """A device's initial pre-copy data is sent: acknowledge once that much is loaded.
    Sent again, for more bytes, when new initial data came back mid pre-copy; the
    ACK then says how much is loaded, and only one of at least ``nbytes`` counts."""

    OP: ClassVar[str] = "initial_sent"
    FROM: ClassVar[str] = "source"
    device: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class Budget(Message):
    """Strict: the destination's share of the downtime budget, as durations from
    its receipt (the source keeps the clock): its vote must be on its way within
    ``left_s``; its settle arcs take ``settle_s`` as the source predicts them."""

    OP: ClassVar[str] = "budget"
    FROM: ClassVar[str] = "source"
    left_s: float
    settle_s: float


@dataclass(frozen=True, slots=True)
class Commit(Message):
    """The source journaled the commit: run every device."""

    OP: ClassVar[str] = "commit"
    FROM: ClassVar[str] = "source"


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """The source decided to abort: reset every device that moved."""

    OP: ClassVar[str] = "abort"
    FROM: ClassVar[str] = "source"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class FinalOutcome(Message):
    """How an aborted migration ended, as the source journaled it."""

    OP: ClassVar[str] = "outcome"
    FROM: ClassVar[str] = "source"
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class DecisionAnswer(Message):
    """The source's answer to a ``DecisionQuery``: its decision and, once known, the outcome."""

    OP: ClassVar[str] = "decision"
    FROM: ClassVar[str] = "source"
    decision: Literal["commit", "abort", "pending"]
    outcome: Outcome | None = None


# -- destination to source --


@dataclass(frozen=True, slots=True)
class ArcReport(Message):
    """One arc a destination device took (or failed), with its duration."""

    OP: ClassVar[str] = "arc"
    FROM: ClassVar[str] = "destination"
    device: str
    from_state: DeviceState
    to_state: DeviceState
    ok: bool
    state: DeviceState
    duration_s: float = 0.0
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class Loaded(Message):
    """A device's whole stream is loaded (its end reached and written)."""

    OP: ClassVar[str] = "loaded"
    FROM: ClassVar[str] = "destination"
    device: str
    nbytes: int
    last_write_s: float = 0.0


@dataclass(frozen=True, slots=True)
class LoadFailed(Message):
    """A device refused its stream; the source must abort."""

    OP: ClassVar[str] = "load_failed"
    FROM: ClassVar[str] = "destination"
    device: str
    state: DeviceState
    error: ErrorInfo


@dataclass(frozen=True, slots=True)
class OverBudget(Message):
    """A step before the vote would not fit in the share (``Budget``) and was not
    begun; the source must abort.  Durations from the share's receipt."""

    OP: ClassVar[str] = "over_budget"
    FROM: ClassVar[str] = "destination"
    step: str
    elapsed_s: float
    need_s: float
    left_s: float
    device: str | None = None


@dataclass(frozen=True, slots=True)
class VcpusReport(Message):
    """The destination's vCPUs were resumed (or failed to be), with the call's duration."""

    OP: ClassVar[str] = "vcpus"
    FROM: ClassVar[str] = "destination"
    action: str
    ok: bool
    status: str | None = None
    duration_s: float = 0.0
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class Vote(Message):
    """Every device stands loaded in its grace state and the vote is journaled."""

    OP: ClassVar[str] = "vote"
    FROM: ClassVar[str] = "destination"


@dataclass(frozen=True, slots=True)
class Completed(Message):
    """After the commit: how the destination ended, which is the migration's outcome."""

    OP: ClassVar[str] = "completed"
    FROM: ClassVar[str] = "destination"
    outcome: Outcome
    errors: tuple[ErrorInfo, ...] = ()
    #: The destination's own time from the commit to its vCPUs (or last device) running.
    resume_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RolledBack(Message):
    """After an abort: every device that moved is reset (``errors``: those that were not)."""

    OP: ClassVar[str] = "rolled_back"
    FROM: ClassVar[str] = "destination"
    errors: tuple[ErrorInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class DecisionQuery(Message):
    """The destination asks for the decision (it is in doubt) or the final outcome."""

    OP: ClassVar[str] = "query"
    FROM: ClassVar[str] = "destination"


@dataclass(frozen=True, slots=True)
class Refused(Message):
    """The peer refused a message the protocol forbids where it stands."""

    OP: ClassVar[str] = "refused"
    #: The op of the message refused.
    message: str
    reason: str


#: Every message, in the order of the protocol's theory of operation.
MESSAGES: tuple[type[Message], ...] = (
    Begin,
    InitialSent,
    Budget,
    Commit,
    Abort,
    FinalOutcome,
    DecisionAnswer,
    ArcReport,
    Loaded,
    LoadFailed,
    OverBudget,
    VcpusReport,
    Vote,
    Completed,
    RolledBack,
    DecisionQuery,
    Refused,
)
_MESSAGES: dict[str, type[Message]] = {cls.OP: cls for cls in MESSAGES}


def encode(message: Message) -> dict[str, Any]:
    """The JSON-ready form of a message: ``{"op": ..., fields...}``."""
    out: dict[str, Any] = {"op": message.OP}
    for f in dataclasses.fields(message):
        out[f.name] = _encode_value(getattr(message, f.name))
    return out


def _encode_value(value: Any) -> Any:
    if isinstance(value, DeviceState):
        return value.name
    if isinstance(value, ErrorInfo):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, tuple):
        return [_encode_value(v) for v in value]
    return value


def decode(data: Mapping[str, Any]) -> Message:
    """The message ``data`` encodes; MalformedMessage names what is wrong."""
    if not isinstance(data, Mapping):
        raise MalformedMessage(f"a message is an object, not {type(data).__name__}")
    op = data.get("op")
    cls = _MESSAGES.get(op) if isinstance(op, str) else None
    if cls is None:
        raise MalformedMessage(f"unknown message op {op!r}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING:
                raise MalformedMessage(f"{op}: field {f.name!r} is missing")
            continue
        try:
            values[f.name] = _decode_value(hints[f.name], data[f.name])
        except (TypeError, ValueError, KeyError) as exc:
            raise MalformedMessage(f"{op}: field {f.name!r}: {exc}") from None
    extra = set(data) - {"op"} - set(values) - {f.name for f in dataclasses.fields(cls)}
    if extra:
        raise MalformedMessage(f"{op}: unknown field(s) {', '.join(sorted(extra))}")
    return cls(**values)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _decode_value(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode_value(inner, value)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{value!r} is not one of {typing.get_args(hint)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        (inner, _ellipsis) = typing.get_args(hint)
        return tuple(_decode_value(inner, v) for v in value)
    if hint is DeviceState:
        if not isinstance(value, str):
            raise TypeError(f"expected a state name, got {value!r}")
        return DeviceState[value]
    if hint is ErrorInfo:
        return ErrorInfo.model_validate(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if hint in (str, int, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise TypeError(f"expected {hint.__name__}, got {value!r}")
        return value
    raise TypeError(f"cannot decode {hint!r}")  # pragma: no cover - a new field type
