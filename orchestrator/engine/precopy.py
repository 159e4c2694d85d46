"""The pre-copy rounds' decision, as the coordinator takes it after each round.

The last device to report a round calls :meth:`PrecopyRounds.decide`: the
bandwidth is what crossed to the destination (not what the kernel still
holds) over the time the rounds took, capped by the limit in force; the
decision is ``convergence.decide_precopy``'s, recorded in the report and the trace.
The limits are the ones in force at the decision (``LiveControl``: an
operator may change them, or force the switchover, while the rounds run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import trio

from orchestrator.convergence import PrecopyDecision, Remaining, decide_precopy
from orchestrator.engine.control import LiveControl
from orchestrator.engine.destination import Destination
from orchestrator.engine.devices import EngineContext
from orchestrator.engine.model import DowntimeModel, Forecast
from orchestrator.engine.recorder import Recorder
from orchestrator.flow import MigrationFlow, Phase

__all__ = ["PrecopyRounds"]

MIB = 1 << 20


class PrecopyRounds:
    """Measures each round and decides: go on, switch over, or abort."""

    def __init__(
        self,
        ctx: EngineContext,
        recorder: Recorder,
        destination: Destination,
        devices: int,
        model: DowntimeModel,
        flow: MigrationFlow,
        live: LiveControl,
    ) -> None:
        self.model = model
        self.live = live
        self.flow = flow
        self.ctx = ctx
        self.plan = ctx.plan
        self.recorder = recorder
        self.destination = destination
        self._devices = devices
        self._ready = 0
        self._round_started = trio.current_time()
        #: Set once the pre-copy deadline passed: every device ends its round now,
        #: and the round's decision is the policy's.
        self.cut = trio.Event()
        #: The last round's forecast of the window.
        self.forecast: Forecast | None = None
        live.attach(self.cut)

    def ready_to_send(self) -> None:
        """A device is in PRE_COPY (or has none): the first round's clock starts with
        the last of them, so that the bandwidth counts no arc time."""
        self._ready += 1
        if self._ready == self._devices:
            self._round_started = trio.current_time()

    def decide(
        self, reports: Mapping[str, Remaining], reported_at: Mapping[str, float]
    ) -> PrecopyDecision:
        recorder = self.recorder
        precopy = recorder.precopy
        now = trio.current_time()
        round_s = now - self._round_started
        recorder.precopy_busy_s += round_s
        self._round_started = now
        precopy.rounds += 1
        # What crossed, not what was handed over: on a deep link queue the kernel
        # holds megabytes that a flushed round has "sent" and not delivered.
        in_flight = self.destination.in_flight_bytes()
        delivered = max(0, recorder.precopy_bytes - in_flight)
        # Rounds that took no time the clock can tell (a virtual clock, a device
        # drained at once) moved their bytes in a microsecond at most.
        busy = max(recorder.precopy_busy_s, 1e-6) if delivered else recorder.precopy_busy_s
        measured = delivered / busy if busy > 0 else 0.0
        limits = self.live.state
        if limits.bandwidth_limit_mib_s is not None:
            limit = limits.bandwidth_limit_mib_s * MIB
            measured = min(measured, limit) if measured > 0 else limit
        # What each device dirties while it runs: over its own round (from the
        # round's start to its report); and it goes on dirtying while it waits
        # for the others' reports, the decision and the switchover.
        started = now - round_s
        rates: dict[str, float] = {}
        for name, r in reports.items():
            own = reported_at.get(name, now) - started
            if r.pre_copy and own > 0:
                rates[name] = r.dirty_bytes / own
        # The switchover waits for the destination to load each device's initial
        # data (its acknowledgement): the devices dirty meanwhile.
        ack_s = self.model.ack_wait_s(self.destination.unacknowledged_bytes(), in_flight, measured)
        waited = {name: now - at + ack_s for name, at in reported_at.items()}
        forecast = self.model.forecast(
            self.flow, reports, measured, rates, waited, self.destination.backlog_bytes()
        )
        self.forecast = forecast
        floor = self.model.floor_ms(
            forecast, {n for n, r in reports.items() if not r.pre_copy}, measured
        )
        decision = decide_precopy(
            self.plan,
            round_number=precopy.rounds,
            remaining=reports,
            bandwidth_bytes_s=measured,
            elapsed_s=now - recorder.phase_started[Phase.PRECOPY],
            predicted_ms=forecast.total_ms,
            margin_ms=forecast.margin_ms,
            floor_ms=floor,
            downtime_limit_ms=limits.downtime_limit_ms,
            forced=limits.switchover_forced,
        )
        precopy.downtime_limit_ms = limits.downtime_limit_ms
        precopy.bandwidth_limit_mib_s = limits.bandwidth_limit_mib_s
        precopy.forecast = forecast.as_report()
        precopy.bandwidth_mib_s = round(measured / MIB, 3) if measured > 0 else None
        precopy.expected_downtime_ms = (
            round(decision.expected_downtime_ms, 3)
            if math.isfinite(decision.expected_downtime_ms)
            else None
        )
        precopy.reason = decision.reason
        precopy.converged = decision.converged
        if decision.action != "continue":
            precopy.decision = decision.action
            self.ctx.log.info(
                "migration.precopy_decision", action=decision.action, reason=decision.reason
            )
        self.ctx.trace.emit("decision", detail={"action": decision.action, "round": precopy.rounds})
        return decision
