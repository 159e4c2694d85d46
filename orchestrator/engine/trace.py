"""What happened in one migration, in order: the trace every test and observer reads.

Every device arc (begun, ended, failed), reset, phase change, barrier
release, pre-copy decision, commit and VMM call of a migration is one
:class:`TraceEvent`, appended in the order it happened and handed at once to
the migration's observers (the journal writer, the metrics).  The trace is
the ground truth the invariant checks of ``tests/invariants.py`` read: the
engine never re-orders it, and a destination on another host reports its
events to the source, which appends them as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import trio

from orchestrator.states import DeviceState, Side
from orchestrator.trace import TraceEvent

__all__ = ["Observer", "Trace", "TraceEvent"]

_NO_DETAIL: Mapping[str, Any] = MappingProxyType({})


Observer = Callable[[TraceEvent], None]


class Trace:
    """The events of one migration and the observers told of each as it is appended."""

    def __init__(self, observers: list[Observer] | None = None) -> None:
        self.events: list[TraceEvent] = []
        #: Called with every event as it is appended; a list callers may extend.
        self.observers: list[Observer] = list(observers or [])

    def emit(
        self,
        kind: str,
        side: Side | None = None,
        device: str | None = None,
        from_state: DeviceState | None = None,
        to_state: DeviceState | None = None,
        detail: Mapping[str, Any] | None = None,
        *,
        time: float | None = None,
    ) -> TraceEvent:
        event = TraceEvent(
            seq=len(self.events),
            time=trio.current_time() if time is None else time,
            kind=kind,
            side=side,
            device=device,
            from_state=from_state,
            to_state=to_state,
            detail=detail or _NO_DETAIL,
        )
        self.events.append(event)
        for observer in self.observers:
            observer(event)
        return event
