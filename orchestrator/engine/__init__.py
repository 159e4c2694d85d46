"""The migration engine: one switchover for one host and two.

``migration.Migration`` coordinates a VM's migration from the source and
drives the destination half through ``destination.Destination``: a
``LocalDestination`` on this host, or the destination daemon of another host
(``orchestrator.peer.remote``), which hosts the same ``DestinationEngine``.
Device calls, their deadlines and what a failed one becomes are
``devices.DeviceDriver``'s; the VMMs' are ``vcpus.Vcpus``'; timings and the
report are ``recorder`` and ``report``'s; the trace is ``trace``'s.
"""

from orchestrator.engine.allowance import OverBudget, Share
from orchestrator.engine.destination import (
    Completion,
    Destination,
    DestinationEngine,
    LeftInDoubt,
    LocalDestination,
)
from orchestrator.engine.devices import (
    DeviceDriver,
    DeviceFailure,
    EngineContext,
    MigrationAborted,
    VmmFailure,
)
from orchestrator.engine.migration import NO_CANCEL_PHASES, ArcHistory, CommitJournal, Migration
from orchestrator.engine.recorder import DOWNTIME_WINDOW
from orchestrator.engine.trace import Observer, Trace, TraceEvent

__all__ = [
    "DOWNTIME_WINDOW",
    "NO_CANCEL_PHASES",
    "ArcHistory",
    "CommitJournal",
    "Completion",
    "Destination",
    "DestinationEngine",
    "DeviceDriver",
    "DeviceFailure",
    "EngineContext",
    "LeftInDoubt",
    "LocalDestination",
    "Migration",
    "MigrationAborted",
    "Observer",
    "OverBudget",
    "Share",
    "Trace",
    "TraceEvent",
    "VmmFailure",
]
