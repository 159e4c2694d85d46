"""The measurements of one migration and the report that holds them.

The recorder watches the migration's trace and keeps, as it happens:

* the time spent in each phase (only one phase's clock runs at a time);
* the downtime window: from the first source device leaving its grace
  state (or the source vCPU pause) to the last destination device running
  (or the destination vCPU resume).  While the migration is inside it, work
  nothing there waits for (journaling the trace) holds back
  (``downtime_window_closed``);
* each device's bytes, barrier waits and own share of the stop path;
* the pre-copy rounds and decisions.

``build`` turns all of it, with the flow's final states, into the
:class:`~orchestrator.report.MigrationReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from orchestrator.convergence import Remaining
from orchestrator.engine.devices import EngineContext
from orchestrator.engine.trace import TraceEvent
from orchestrator.flow import Phase
from orchestrator.report import BarrierReport, InitialReturn, PrecopyReport
from orchestrator.states import RUNNING_STATES, DeviceState, Side

__all__ = ["DOWNTIME_WINDOW", "DeviceStats", "Recorder"]

#: The downtime window: from the source grace barrier (where a VMM's vCPUs
#: pause) until the destination runs.  Work that nothing in the window waits
#: for (journaling the trace) is held back while a migration is inside it.
DOWNTIME_WINDOW = frozenset(
    {Phase.SOURCE_GRACE, Phase.STOP_COPY, Phase.DESTINATION_GRACE, Phase.COMMIT, Phase.RESUME}
)


@dataclass
class DeviceStats:
    bytes_precopy: int = 0
    bytes_stopcopy: int = 0
    barrier_wait_s: dict[str, float] = field(default_factory=dict)
    # This device's own busy time from its stop to its destination running.
    stop_path_s: float = 0.0
    remaining: Remaining | None = None


class Recorder:
    """Times, waits and bytes of one migration; a trace observer (``observe``)."""

    def __init__(self, ctx: EngineContext, names: list[str], *, vcpus: bool) -> None:
        self.ctx = ctx
        self.stats: dict[str, DeviceStats] = {name: DeviceStats() for name in names}
        self.precopy = PrecopyReport()
        #: With VMMs the downtime runs from the vCPU pause to the vCPU resume.
        self._vcpus = vcpus
        self.t0: float | None = None
        self.downtime_start: float | None = None
        self.downtime_end: float | None = None
        self.precopy_bytes = 0
        self.precopy_busy_s = 0.0
        self.barrier_waits: dict[str, list[float]] = {}
        self.barrier_members: dict[str, int] = {}
        # When each phase was first entered, and the phase whose clock runs.
        self.phase_started: dict[Phase, float] = {}
        self._timed_phase: Phase | None = None
        self._timed_since = 0.0
        self.phase_ms: dict[str, float] = {}
        self._window_closed = trio.Event()
        self._window_closed.set()
        self._committed = False

    def progress(self, phase: Phase) -> dict[str, Any]:
        """A snapshot for progress displays and the API; cheap, never blocks."""
        remaining = [s.remaining for s in self.stats.values()]
        known = [r for r in remaining if r is not None]
        return {
            "phase": phase.value,
            # The round under way during pre-copy; the rounds done after it.
            "precopy_round": self.precopy.rounds + (1 if phase is Phase.PRECOPY else 0),
            "bytes_sent": {
                name: s.bytes_precopy + s.bytes_stopcopy for name, s in self.stats.items()
            },
            # Only once every device has said what it still has to send.
            "remaining_bytes": (
                sum(r.stop_copy_bytes for r in known) if len(known) == len(remaining) else None
            ),
            "expected_downtime_ms": self.precopy.expected_downtime_ms,
        }

    def start(self) -> None:
        self.t0 = trio.current_time()
        self.enter(Phase.PREPARE)

    def observe(self, event: TraceEvent) -> None:
        """The downtime's ends, from the trace as it is written."""
        kind, side = event.kind, event.side
        if kind == "arc_begin":
            if (
                side is Side.SOURCE
                and self.downtime_start is None
                and event.to_state not in RUNNING_STATES
                and self.ctx.phase == Phase.STOP_COPY.value
            ):
                self.downtime_start = event.time
        elif kind == "arc_end":
            if (
                side is Side.DESTINATION
                and event.to_state is DeviceState.RUNNING
                and self._committed
                and not self._vcpus
            ):
                self.downtime_end = event.time
        elif kind == "commit":
            self._committed = True
        elif kind in ("vmm_begin", "vmm_end"):
            action = event.detail["action"]
            if (side, kind, action) == (Side.SOURCE, "vmm_begin", "pause"):
                self.downtime_start = event.time
            elif (side, kind, action) == (Side.DESTINATION, "vmm_end", "resume"):
                self.downtime_end = event.time

    # -- phases ----------------------------------------------------------------

    def enter(self, phase: Phase) -> float:
        """Stop the clock of the phase being timed and start ``phase``'s.

        Returns the seconds the stopped phase took.  DONE stops every clock,
        so calling this with DONE again changes nothing.
        """
        if phase in DOWNTIME_WINDOW:
            if self._window_closed.is_set():
                self._window_closed = trio.Event()
        else:
            self._window_closed.set()
        now = trio.current_time()
        duration = 0.0
        if self._timed_phase is not None:
            duration = now - self._timed_since
            key = self._timed_phase.value
            self.phase_ms[key] = self.phase_ms.get(key, 0.0) + duration * 1000
        self._timed_phase = None if phase is Phase.DONE else phase
        self._timed_since = now
        self.phase_started.setdefault(phase, now)
        return duration

    def stop(self) -> None:
        self.enter(Phase.DONE)

    @property
    def in_downtime_window(self) -> bool:
        return not self._window_closed.is_set()

    async def downtime_window_closed(self) -> None:
        await self._window_closed.wait()

    # -- measurements -------------------------------------------------------------

    def initial_back(self, name: str, nbytes: int, *, reacknowledge: bool) -> None:
        """A source device reported new initial data in the round under way."""
        back = InitialReturn(
            device=name, bytes=nbytes, round=self.precopy.rounds + 1, reacknowledge=reacknowledge
        )
        self.precopy.initial_returns.append(back)
        self.ctx.trace.emit(
            "initial_back",
            Side.SOURCE,
            name,
            detail={"bytes": nbytes, "round": back.round, "reacknowledge": reacknowledge},
        )
        self.ctx.log.info(
            "migration.initial_back",
            device=name,
            bytes=nbytes,
            round=back.round,
            reacknowledge=reacknowledge,
        )

    def barrier_wait(self, name: str, barrier: str, seconds: float) -> None:
        self.stats[name].barrier_wait_s[barrier] = seconds
        self.barrier_waits.setdefault(barrier, []).append(seconds)

    def barriers(self) -> dict[str, BarrierReport]:
        return {
            name: BarrierReport(
                members=self.barrier_members.get(name, 0),
                wait_ms_max=round(max(waits) * 1000, 3),
                wait_ms_mean=round(sum(waits) / len(waits) * 1000, 3),
            )
            for name, waits in self.barrier_waits.items()
        }

    def downtime_ms(
        self, committed: bool, trace: list[TraceEvent], *, vcpus_paused: bool
    ) -> float | None:
        """From the first source stop to the destination running, or after a
        rollback to the source running again (None: it never ran again)."""
        if self.downtime_start is None:
            return None
        end = self.downtime_end if committed else _last_source_running(trace, vcpus_paused)
        if end is None:
            return None
        return round((end - self.downtime_start) * 1000, 3)

    def duration_ms(self) -> float:
        assert self.t0 is not None
        return round((trio.current_time() - self.t0) * 1000, 3)


def _last_source_running(trace: list[TraceEvent], vcpus: bool) -> float | None:
    if vcpus:
        # The VM runs again when its vCPUs do (None: they never did).
        resumed = [
            e.time
            for e in trace
            if e.kind == "vmm_end" and e.side is Side.SOURCE and e.detail["action"] == "resume"
        ]
        return max(resumed) if resumed else None
    times = [
        e.time
        for e in trace
        if e.side is Side.SOURCE
        and e.kind in ("arc_end", "reset")
        and e.to_state is DeviceState.RUNNING
    ]
    return max(times) if times else None
