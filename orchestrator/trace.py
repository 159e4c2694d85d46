"""One thing that happened in a migration: the trace's event, as plain data.

A leaf module (no trio, no engine) so that what only reads traces (the
journal, the metrics) does not pull in the engine that writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.states import DeviceState, Side

__all__ = ["TraceEvent"]


@dataclass(slots=True)
class TraceEvent:
    """One thing that happened, in order.  Tests check invariants on the trace."""

    seq: int
    time: float
    # arc_begin, arc_end, arc_failed, arc_settled (an arc cut short by a
    # cancellation: to_state is where the device was found), reset, phase,
    # barrier, commit, decision, switchover_ack, initial_back (detail: bytes,
    # round, reacknowledge), vmm_begin, vmm_end, vmm_failed (detail: action)
    kind: str
    side: Side | None
    device: str | None
    from_state: DeviceState | None
    to_state: DeviceState | None
    detail: Mapping[str, Any]
