"""The downtime budget: the pause the VM may see, checked before every step.

With ``downtime_policy = "strict"`` the limit is a promise about the VM's
pause whether the migration succeeds or rolls back.  Before each step on the
critical path until the commit point (the VMM pause, the source grace arcs,
the stop arcs, the destination's settle, the vote, the commit record) the
budget checks

    elapsed pause + max(predicted rest of the window,
                        this step + a rollback from where it leaves the devices)

against the limit.  The second term is what keeps a rollback possible: a
step is only taken if, should the next check fail, the sources can still
return to RUNNING (and the vCPUs resume) within the limit.  When the check
fails, the migration rolls back at once.

Between checks a watchdog holds the same promise against a step that
overruns its prediction: once the pause reaches the limit less the cost of
a rollback from where the devices stand, it rolls back before it is too late
to keep the limit.  After the commit the migration completes whatever the
clock says (the VM then runs only on the destination).

With ``best_effort`` the same checks are taken and reported, and nothing is
done about them.  The clock is this host's, the source's: between hosts the
destination reports durations, never timestamps.

Between hosts the destination's own steps before its vote (each device's
settle arcs once its stream is loaded, then the vote) run on its clock, not
this one.  When the source barrier releases, strict hands the destination
its share as a duration (:meth:`DowntimeBudget.share`: the time left until
its vote must be here, less the round trip), and the destination's
:class:`Allowance` refuses to start a step that cannot fit in what is left
of it (:class:`OverBudget`, reported back as durations): the source then
rolls back, the step it blew named.  A settle that would end past the point
where a rollback still fits is never begun (``engine.allowance``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from orchestrator.engine.allowance import OverBudget, Share
from orchestrator.engine.devices import EngineContext, MigrationAborted
from orchestrator.engine.model import DowntimeModel, Figure, Forecast
from orchestrator.engine.recorder import Recorder
from orchestrator.engine.trace import TraceEvent
from orchestrator.flow import MigrationFlow
from orchestrator.states import DeviceState, Side

__all__ = ["STEPS", "BudgetCheck", "DowntimeBudget"]

#: The window's components in the order the switchover meets them (the model's names).
COMPONENTS = (
    "pause",
    "grace_arcs",
    "stop_arcs",
    "transfer",
    "settle_arcs",
    "commit",
    "control",
    "run_arcs",
    "resume",
)

#: The checked steps: each names the first component still ahead when it is taken.
STEPS = {
    "pause": "pause",
    "grace_arcs": "grace_arcs",
    "stop_arcs": "stop_arcs",
    "settle_arcs": "settle_arcs",
    "vote": "commit",
    "commit": "commit",
}

S = Side.SOURCE

#: The watchdog wakes this much before its cutoff: a timer here fires up to a
#: millisecond late (epoll waits round up to whole milliseconds), and a loaded
#: event loop takes another to run the task it wakes.
WATCHDOG_EARLY_S = 0.002


@dataclass(frozen=True)
class BudgetCheck:
    """One check: where the pause stood, and what was predicted from there."""

    step: str
    elapsed_ms: float
    #: The rest of the window, this step included.
    forward_ms: float
    #: This step and then a rollback from where it leaves the source devices.
    fallback_ms: float
    limit_ms: float

    @property
    def worst_ms(self) -> float:
        return self.elapsed_ms + max(self.forward_ms, self.fallback_ms)

    @property
    def fits(self) -> bool:
        return self.worst_ms <= self.limit_ms

    def as_report(self) -> dict[str, object]:
        return {
            "step": self.step,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "forward_ms": _finite(self.forward_ms),
            "fallback_ms": _finite(self.fallback_ms),
            "fits": self.fits,
        }


class DowntimeBudget:
    """Checks the pause against the limit; see the module docstring."""

    def __init__(
        self,
        ctx: EngineContext,
        model: DowntimeModel,
        recorder: Recorder,
        *,
        strict: bool,
        limit_ms: Callable[[], float],
    ) -> None:
        self.ctx = ctx
        self.model = model
        self.recorder = recorder
        self.strict = strict
        self._limit_ms = limit_ms
        self.forecast: Forecast | None = None
        self.checks: list[BudgetCheck] = []
        #: The step (or "watchdog") that blew the budget, and by how much.
        self.blown: BudgetCheck | None = None
        self._start: float | None = None
        self._started = trio.Event()
        self._armed = True
        self._cutoff = math.inf
        self._moved = trio.Event()
        #: The destination's share, once it took one (between hosts, strict only).
        self.granted: Share | None = None

    # -- the clock ---------------------------------------------------------------

    def observe(self, event: TraceEvent) -> None:
        """The window's start, as the recorder saw it (observers run after it)."""
        if self._start is None and self.recorder.downtime_start is not None:
            self._start = self.recorder.downtime_start
            self._started.set()

    def elapsed_s(self) -> float:
        return 0.0 if self._start is None else trio.current_time() - self._start

    # -- the checks ----------------------------------------------------------------

    def check(self, step: str, flow: MigrationFlow) -> None:
        """Before ``step``: record the check; under strict, roll back if it fails."""
        if self.blown is not None:
            # The watchdog rolled back already: no step goes on, the commit least of all.
            raise MigrationAborted("the strict downtime budget is blown")
        if not self._armed or self.forecast is None:
            return
        # One rollback figure serves the check and the watchdog's new cutoff: it
        # walks every device, inside the window.
        rollback = self._rollback_ms(flow, after=STEPS.get(step, "commit"))
        check = self._measure(step, flow, rollback)
        self.checks.append(check)
        self._rearm(rollback)
        if not check.fits and self.strict:
            raise self._blow(check, f"before {step}")

    def share(self, flow: MigrationFlow, rtt_s: float) -> Share | None:
        """Strict only: the destination's share, from now, for its steps before the
        vote (the moment the vote check would still pass, less the round trip)."""
        if not self.strict or not self._armed or self.forecast is None:
            return None
        vote = self._measure("vote", flow)
        return Share(
            left_s=max(0.0, (vote.limit_ms - vote.worst_ms) / 1000 - rtt_s),
            settle_s=self.forecast.components.get("settle_arcs", Figure(0.0, "none")).ms / 1000,
        )

    def refused_by_destination(self, over: OverBudget) -> MigrationAborted:
        """The destination refused a step of its share: roll back, naming it."""
        step = f"{over.step} (destination)"
        if self.blown is not None:
            return MigrationAborted("the strict downtime budget is blown")
        elapsed = self.elapsed_s() * 1000
        # What it says, as this side's check: the limit overrun by what the step overruns.
        ahead = self._limit_ms() + over.over_s * 1000 - elapsed
        check = BudgetCheck(step, elapsed, ahead, ahead, self._limit_ms())
        self.checks.append(check)
        where = f"at the destination, before {over.step}" + (
            f" of {over.device}" if over.device else ""
        )
        return self._blow(check, where)

    def disarm(self) -> None:
        """The commit point: from here the migration completes whatever the clock says."""
        self._armed = False
        self._moved.set()

    async def watch(self, flow: MigrationFlow) -> None:
        """The watchdog: rolls back once the pause reaches the limit less the cost
        of a rollback from where the devices stand (strict only)."""
        if not self.strict:
            return
        await self._started.wait()
        while self._armed:
            moved = self._moved = trio.Event()
            with trio.move_on_at(self._start_or_now() + self._cutoff):
                await moved.wait()
                continue
            if not self._armed:
                return
            check = self._measure("watchdog", flow)
            self.checks.append(check)
            raise self._blow(
                check,
                "at the last moment a rollback fits the limit (a step overran its prediction)",
            )

    # -- what the checks compute ------------------------------------------------------

    def _measure(
        self, step: str, flow: MigrationFlow, rollback_ms: float | None = None
    ) -> BudgetCheck:
        """The check before ``step``; ``rollback_ms``: a rollback's cost from after it,
        where the caller has it already."""
        assert self.forecast is not None
        components = self.forecast.components
        first = COMPONENTS.index(STEPS.get(step, "commit"))
        ahead = [components[c].ms for c in COMPONENTS[first:] if c in components]
        overhead = components.get("overhead", Figure(0.0, "none")).ms
        forward = sum(ahead) + overhead
        this_step = components[COMPONENTS[first]].ms if COMPONENTS[first] in components else 0.0
        if rollback_ms is None:
            rollback_ms = self._rollback_ms(flow, after=STEPS.get(step, "commit"))
        fallback = this_step + rollback_ms
        if step == "watchdog":
            forward, fallback = 0.0, self._rollback_ms(flow, after="commit")
        return BudgetCheck(step, self.elapsed_s() * 1000, forward, fallback, self._limit_ms())

    def _rollback_ms(self, flow: MigrationFlow, *, after: str) -> float:
        """A rollback once ``after`` is done: every source device back to RUNNING
        through the reverse barrier (grace states first), then the vCPUs resume."""
        resume = self.model.vmm(S).ms if self.model.vcpus else 0.0
        if after == "pause":
            return resume  # the devices still run: only the vCPUs resume
        # The orchestrator's own work for each device on the way back, as forward.
        resume += self.model.overhead_s(len(flow.side(S))) * 1000
        quiesce, final, first = 0.0, 0.0, 0.0
        for e in flow.side(S):
            start = (e.route.grace or e.state) if after == "grace_arcs" else DeviceState.STOP_COPY
            grace = DeviceState.RUNNING_P2P if e.barrier and e.capabilities.p2p else None
            if grace is not None and start is not grace:
                quiesce = max(quiesce, self.model.walk(S, e.name, start, grace).ms)
                final = max(final, self.model.walk(S, e.name, grace, DeviceState.RUNNING).ms)
            elif e.name == flow.ordered:
                # It runs before its peers leave their grace states.
                first = self.model.walk(S, e.name, start, DeviceState.RUNNING).ms
            else:
                final = max(final, self.model.walk(S, e.name, start, DeviceState.RUNNING).ms)
        return quiesce + first + final + resume

    def _rearm(self, rollback_ms: float) -> None:
        """The watchdog's cutoff: the limit less a rollback (``rollback_ms``) from
        after the step just checked."""
        self._cutoff = (self._limit_ms() - rollback_ms) / 1000 - WATCHDOG_EARLY_S
        self._moved.set()

    def _start_or_now(self) -> float:
        return self._start if self._start is not None else trio.current_time()

    def _blow(self, check: BudgetCheck, where: str) -> MigrationAborted:
        self.blown = check
        over = max(0.0, check.worst_ms - check.limit_ms)
        self.ctx.log.warning(
            "migration.budget_blown",
            step=check.step,
            elapsed_ms=round(check.elapsed_ms, 3),
            over_ms=round(over, 3),
            limit_ms=check.limit_ms,
        )
        ahead = max(check.forward_ms, check.fallback_ms)
        verdict = (
            f"over the {check.limit_ms:g} ms limit by {over:.1f} ms"
            if over
            else (f"the most the {check.limit_ms:g} ms limit allows")
        )
        return self.ctx.abort(
            "downtime_budget",
            f"strict downtime budget {where}: {check.elapsed_ms:.1f} ms paused + "
            f"{ahead:.1f} ms predicted is {verdict}; rolled back",
        )

    def as_report(self, pause_ms: float | None) -> dict[str, object]:
        blown = self.blown
        return {
            "policy": "strict" if self.strict else "best_effort",
            "limit_ms": self._limit_ms(),
            "checks": [c.as_report() for c in self.checks],
            "blown_at": blown.step if blown is not None else None,
            "over_ms": (
                round(max(0.0, blown.worst_ms - blown.limit_ms), 3) if blown is not None else None
            ),
            "pause_ms": pause_ms,
            "destination_share": (
                None
                if self.granted is None
                else {
                    "left_ms": round(self.granted.left_s * 1000, 3),
                    "settle_ms": round(self.granted.settle_s * 1000, 3),
                }
            ),
        }


def _finite(ms: float) -> float | None:
    return round(ms, 3) if math.isfinite(ms) else None
