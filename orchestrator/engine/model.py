"""The downtime a switchover will take: its critical path, as this migration will run it.

The window runs from the source vCPU pause (or, without a VMM, the first
source device leaving its grace state) to the destination vCPU resume (or
the last destination device running).  On it, in order:

    pause            the source VMM's pause (with a [vmm])
    grace_arcs       every source device to its grace state (with a [vmm]: the
                     pause comes first; without one, before the window)
    stop_arcs        the slowest source device's stop (grace -> STOP_COPY)
    transfer         every device's stop-copy bytes over the bandwidth: what it
                     had left when the decision was taken, plus what it dirties
                     until it stops (its measured dirty rate over the lead time)
    settle_arcs      the slowest destination device's walk to its grace state
                     once its stream is loaded (RESUMING -> STOP -> RUNNING_P2P)
    commit           the commit record, on disk
    control          the commit protocol's messages between two hosts
    run_arcs         the slowest destination device's run (grace -> RUNNING)
    resume           the destination VMM's resume (with a [vmm])
    overhead         the orchestrator's own work per device inside the window

Arcs that have not run yet come, in this order of preference, from this
migration's own measurement of that arc on that device (``measured``), the
figure the device's backend declares (``declared``: the simulator knows its
transition latency), the mean of the arcs the device did walk
(``estimated``), or nothing (``unknown``, 0).  Every figure says where it
came from, and the report shows them beside what the switchover measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.convergence import Remaining
from orchestrator.engine.destination import Destination
from orchestrator.engine.devices import DeviceDriver
from orchestrator.engine.trace import TraceEvent
from orchestrator.flow import MigrationFlow
from orchestrator.states import DeviceState, Side, path

__all__ = [
    "OVERHEAD_PER_DEVICE_S",
    "REMOTE_OVERHEAD_PER_DEVICE_S",
    "DeviceForecast",
    "DowntimeModel",
    "Figure",
    "Forecast",
]

#: The orchestrator's own work per device inside the downtime window: the arcs'
#: tasks and reports, the barrier, the trace (bench/downtime_scaling.py measured
#: about 300 us a device on these 2 cores; issue 20 is to shrink it).
OVERHEAD_PER_DEVICE_S = 300e-6
#: Between two hosts, per device on top of that: each device's stream end,
#: load and arc reports cross as messages the source handles one by one
#: (bench/downtime_promise.py: about 0.7 ms a device on these 2 cores, in the
#: destination's grace and resume phases).
REMOTE_OVERHEAD_PER_DEVICE_S = 700e-6

S, D = Side.SOURCE, Side.DESTINATION


@dataclass(frozen=True)
class Figure:
    """A predicted duration and where its figure came from."""

    ms: float
    source: str

    @classmethod
    def of(cls, seconds: float, source: str) -> Figure:
        return cls(round(seconds * 1000, 3) if math.isfinite(seconds) else math.inf, source)


@dataclass(frozen=True)
class DeviceForecast:
    """One device's share of the window."""

    grace_arcs: Figure
    stop_arcs: Figure
    #: What it will send once stopped: left at the decision, plus dirtied until then.
    stop_bytes: int
    settle_arcs: Figure
    run_arcs: Figure
    #: Sent before and not yet loaded at the destination: loaded before it settles.
    backlog_bytes: int = 0


#: How far each kind of figure may be off, as a share of it: the forecast's
#: margin is what the switchover decision keeps in hand (converged: the window
#: plus its margin fits the limit).  A figure this migration measured, or a
#: backend declares, varies with the machine's load; a history is other
#: migrations'; an estimate is a mean of other arcs; the orchestrator's own
#: work per device is a constant measured on quiet machines, and a loaded
#: machine doubles it (bench/downtime_promise.py prints the ratios).
UNCERTAINTY = {
    "measured": 0.10,
    "declared": 0.10,
    "history": 0.25,
    "estimated": 0.50,
    "transfer": 0.15,
    "overhead": 1.00,
    "io": 0.50,
}


def uncertainty(component: str, figure: Figure) -> float:
    """The share of ``figure`` (a component of the window) it may be off by."""
    if component in ("transfer", "overhead"):
        return UNCERTAINTY[component]
    if component in ("commit", "control"):
        return UNCERTAINTY["io"]  # a disk's flush, a network's round trip
    kind = figure.source.split(" ", 1)[0]
    return UNCERTAINTY.get(kind, UNCERTAINTY["estimated"])


def margin_of(components: Mapping[str, Figure]) -> float:
    """How much longer ``components`` may take, by how sure each one is."""
    return sum(f.ms * uncertainty(k, f) for k, f in components.items())


@dataclass
class Forecast:
    """The predicted downtime: the critical path's components, and per device."""

    total_ms: float
    components: dict[str, Figure] = field(default_factory=dict)
    devices: dict[str, DeviceForecast] = field(default_factory=dict)

    @property
    def margin_ms(self) -> float:
        """How much longer the window may take, by how sure each component is."""
        margin = margin_of(self.components)
        return round(margin, 3) if math.isfinite(margin) else math.inf

    def as_report(self) -> dict[str, object]:
        def figure(f: Figure) -> dict[str, object]:
            return {"ms": f.ms if math.isfinite(f.ms) else None, "source": f.source}

        margin = self.margin_ms
        return {
            "total_ms": self.total_ms if math.isfinite(self.total_ms) else None,
            "margin_ms": margin if math.isfinite(margin) else None,
            "components": {k: figure(v) for k, v in self.components.items()},
            "devices": {
                name: {
                    "grace_arcs": figure(d.grace_arcs),
                    "stop_arcs": figure(d.stop_arcs),
                    "stop_bytes": d.stop_bytes,
                    "settle_arcs": figure(d.settle_arcs),
                    "run_arcs": figure(d.run_arcs),
                }
                for name, d in self.devices.items()
            },
        }


@dataclass
class Inputs:
    """What the model reads as the migration goes (each None until measured)."""

    #: A VMM call's duration on each side (its status check, before the pause).
    vmm_s: dict[Side, float] = field(default_factory=dict)
    #: One durable write on the journal that records the commit.
    commit_s: float | None = None
    #: The round trip to the destination daemon (None: one host, or not yet).
    rtt_s: float | None = None


class DowntimeModel:
    """Predicts the downtime window; a trace observer for the arcs it measures."""

    def __init__(
        self,
        driver: DeviceDriver,
        *,
        vcpus: bool,
        remote: bool,
        destination: Destination | None = None,
        read_chunk_bytes: int = 1 << 20,
    ) -> None:
        self.driver = driver
        #: This host's arc history for the devices' models (see Device.model_key):
        #: (model, side, from, to) as text -> mean seconds.
        self.history: dict[tuple[str, str, str, str], float] = {}
        #: Another host's destination devices: the figures their backends declared.
        self.destination = destination
        self.read_chunk_bytes = read_chunk_bytes
        self.vcpus = vcpus
        self.remote = remote
        self._arcs: dict[tuple[Side, str, DeviceState, DeviceState], float] = {}
        self._walked: dict[tuple[Side, str], list[float]] = {}
        self.inputs = Inputs()

    def observe(self, event: TraceEvent) -> None:
        if event.kind == "arc_end" and event.side is not None and event.device is not None:
            assert event.from_state is not None and event.to_state is not None
            seconds = float(event.detail.get("duration_s", 0.0))
            key = (event.side, event.device, event.from_state, event.to_state)
            self._arcs[key] = seconds
            self._walked.setdefault((event.side, event.device), []).append(seconds)

    # -- one arc ---------------------------------------------------------------

    def arc(self, side: Side, name: str, source: DeviceState, target: DeviceState) -> Figure:
        seconds = self._arcs.get((side, name, source, target))
        if seconds is not None:
            return Figure.of(seconds, "measured")
        device = self.driver.devices.get((side, name))
        if device is not None:
            declared = device.declared_arc_s(source, target)
        elif side is D and self.destination is not None:
            declared = self.destination.declared_arc_s(name, source, target)
        else:
            declared = None
        if declared is not None:
            return Figure.of(declared, "declared")
        if device is None and side is D and self.destination is not None:
            past_there = self.destination.history_arc_s(name, source, target)
            if past_there is not None:
                return Figure.of(past_there, "history")
        model = device.model_key() if device is not None else None
        if model is not None:
            past = self.history.get((model, side.value, source.name, target.name))
            if past is not None:
                return Figure.of(past, "history")
        walked = self._walked.get((side, name))
        if walked:
            return Figure.of(sum(walked) / len(walked), "estimated")
        return Figure(0.0, "unknown")

    # -- the whole window -------------------------------------------------------------

    def forecast(
        self,
        flow: MigrationFlow,
        remaining: Mapping[str, Remaining],
        bandwidth_bytes_s: float,
        dirty_bytes_s: Mapping[str, float],
        waited_s: Mapping[str, float] | None = None,
        backlog_bytes: Mapping[str, int] | None = None,
    ) -> Forecast:
        """The window as this migration would run it if it switched over now
        (``waited_s``: how long ago each device reported what it has left;
        ``backlog_bytes``: what its destination has still to load of what was sent)."""
        comps: dict[str, Figure] = {}
        devices: dict[str, DeviceForecast] = {}
        pause = self.vmm(S) if self.vcpus else Figure(0.0, "no vmm")
        comps["pause"] = pause
        grace, stop, settle, run = [], [], [], []
        for name, r in remaining.items():
            src, dst = flow.endpoint(S, name), flow.endpoint(D, name)
            g = (
                self.walk(S, name, src.state, src.route.grace)
                if src.route.grace is not None
                else Figure(0.0, "no grace state")
            )
            s = self.walk(S, name, src.route.grace or src.state, DeviceState.STOP_COPY)
            settle_target = dst.route.grace or dst.route.settle
            st = self.walk(D, name, DeviceState.RESUMING, settle_target)
            assert dst.route.final is not None
            rn = self.walk(D, name, settle_target, dst.route.final)
            # It runs, and dirties, from its report until its stop ends: the wait
            # for the decision, the switchover acknowledgement (a round trip
            # between hosts), the pause, its grace arcs (before the window too,
            # without a VMM) and its stop arcs.
            lead_s = (waited_s or {}).get(name, 0.0) + (pause.ms + g.ms + s.ms) / 1000
            if self.remote and self.inputs.rtt_s is not None:
                lead_s += self.inputs.rtt_s
            device = self.driver.devices.get((S, name))
            declared = device.declared_dirty_bytes(lead_s) if device is not None else None
            rate = dirty_bytes_s.get(name, 0.0)
            dirtied = declared if declared is not None else int(rate * lead_s)
            nbytes = r.stop_copy_bytes + dirtied
            backlog = (backlog_bytes or {}).get(name, 0)
            devices[name] = DeviceForecast(g, s, nbytes, st, rn, backlog)
            grace.append(g)
            stop.append(s)
            settle.append(st)
            run.append(rn)
        # The ordered device stops between its peers' grace arcs and their stop
        # arcs, and runs before they do: its arcs add to theirs.
        ordered = flow.ordered
        comps["grace_arcs"] = _slowest(grace) if self.vcpus else Figure(0.0, "before the window")
        comps["stop_arcs"] = _then(devices, ordered, "stop_arcs", stop)
        comps["transfer"] = self.transfer(devices, bandwidth_bytes_s)
        comps["settle_arcs"] = _slowest(settle)
        commit = self.inputs.commit_s
        comps["commit"] = (
            Figure.of(commit, "measured (journal write)")
            if commit is not None
            else Figure(0, "unknown")
        )
        if self.remote:
            rtt = self.inputs.rtt_s
            # The vote one way, the commit the other, the last report back.
            comps["control"] = (
                Figure.of(1.5 * rtt, "measured (channel handshake)")
                if rtt is not None
                else Figure(0.0, "unknown")
            )
        comps["run_arcs"] = _then(devices, ordered, "run_arcs", run)
        comps["resume"] = self.vmm(D) if self.vcpus else Figure(0.0, "no vmm")
        comps["overhead"] = Figure.of(self.overhead_s(len(remaining)), "estimated")
        total = sum(f.ms for f in comps.values())
        return Forecast(round(total, 3) if math.isfinite(total) else math.inf, comps, devices)

    def history_models(self) -> set[str]:
        """The models of this host's devices that keep an arc history."""
        keys = (device.model_key() for device in self.driver.devices.values())
        return {key for key in keys if key is not None}

    def overhead_s(self, devices: int) -> float:
        """The orchestrator's own work inside the window for ``devices`` devices."""
        per = OVERHEAD_PER_DEVICE_S + (REMOTE_OVERHEAD_PER_DEVICE_S if self.remote else 0.0)
        return per * devices

    def walk(self, side: Side, name: str, source: DeviceState, target: DeviceState) -> Figure:
        """A device's walk from ``source`` to ``target``: its arcs' figures summed."""
        flow = self.driver.flow
        assert flow is not None
        e = flow.endpoint(side, name)
        total, sources, state = 0.0, set(), source
        for step in path(e.capabilities.flags, source, target):
            f = self.arc(side, name, state, step)
            total += f.ms
            sources.add(f.source)
            state = step
        return Figure(round(total, 3), _weakest(sources) if sources else "none")

    def floor_ms(
        self,
        forecast: Forecast,
        fixed: set[str],
        bandwidth_bytes_s: float,
        *,
        margin: bool = True,
    ) -> float:
        """What no pre-copy round can shrink: the window with only the bytes of the
        ``fixed`` devices (those without pre-copy; what the others still send may
        shrink, or not), with (``margin``) what convergence keeps in hand for it.
        A transfer no bandwidth measures yet is unknown, not infinite: it counts
        nothing here."""
        floor = {k: f for k, f in forecast.components.items() if k != "transfer"}
        transfer = self.transfer(
            {n: d for n, d in forecast.devices.items() if n in fixed}, bandwidth_bytes_s
        )
        if math.isfinite(transfer.ms):
            floor["transfer"] = transfer
        total = sum(f.ms for f in floor.values())
        return total + margin_of(floor) if margin else total

    def transfer(self, devices: Mapping[str, DeviceForecast], bandwidth_bytes_s: float) -> Figure:
        """Every device's stop-copy bytes over the bandwidth, then the last piece's
        load at its destination; and no device faster than its own declared rates
        (a source that produces its stream slowly, a destination that loads it
        slowly: the slower sets the pace, and the last piece one side reads the
        other still has to take)."""
        total = sum(d.stop_bytes for d in devices.values())
        paces = {
            name: self._own_pace(name, d.stop_bytes, d.backlog_bytes) for name, d in devices.items()
        }
        cap = self.driver.ctx.plan.bandwidth_limit_mib_s
        paced = all(paces[n][0] > 0 for n, d in devices.items() if d.stop_bytes)
        if not self.remote and cap is None and paced:
            # One host, no cap, every device's pace known: memory is no bottleneck,
            # and the pre-copy's average rate (one slow round alone at its end)
            # would say less than the devices' own paces do.
            seconds, source = 0.0, "one host: memory"
        elif bandwidth_bytes_s > 0:
            seconds, source = total / bandwidth_bytes_s, "measured bandwidth"
        elif not self.remote:
            seconds, source = 0.0, "one host: memory"
        else:
            seconds, source = (0.0 if total == 0 else math.inf), "no bandwidth measured"
        # The shared link, then the slowest load of a last piece.
        seconds += max((last for _, last in paces.values()), default=0.0)
        for name, (own, _) in paces.items():
            if own > seconds:
                seconds, source = own, f"declared rates of {name}"
        return Figure.of(seconds, source)

    def ack_wait_s(
        self, unacknowledged: Mapping[str, int], in_flight: int, bandwidth_bytes_s: float
    ) -> float:
        """How long the switchover-ack will wait: each device's initial data not yet
        loaded (exact on this host; from another, no more than the last piece
        read) at its destination's declared pace, side by side; between hosts at
        least what is in flight on the link over the bandwidth."""
        waits = [0.0]
        if (self.remote or not unacknowledged) and bandwidth_bytes_s > 0:
            # Between hosts the link's queue drains before the acknowledgement can come.
            waits.append(in_flight / bandwidth_bytes_s)
        for name, nbytes in unacknowledged.items():
            if self.remote:
                # Another host's figure is the whole announcement: the source hands
                # a piece over once read, so the destination lags one piece behind.
                device = self.driver.devices.get((S, name))
                piece = device.declared_read_bytes(self.read_chunk_bytes) if device else nbytes
                nbytes = min(nbytes, piece)
            rate = self._load_rate(name) or bandwidth_bytes_s
            waits.append(nbytes / rate if rate > 0 else 0.0)
        return max(waits)

    def _load_rate(self, name: str) -> float | None:
        """How fast the device's destination loads its stream, where declared."""
        target = self.driver.devices.get((D, name))
        if target is not None:
            return target.declared_rate_bytes_s()
        if self.destination is not None:
            return self.destination.declared_rate_bytes_s(name)
        return None

    def _own_pace(self, name: str, nbytes: int, backlog: int = 0) -> tuple[float, float]:
        """How long one device's stream takes at its own rates, and how long its
        destination takes to load the last piece read (and, first, its ``backlog``)."""
        if nbytes == 0 and backlog == 0:
            return 0.0, 0.0
        device = self.driver.devices.get((S, name))
        src = device.declared_rate_bytes_s() if device is not None else None
        piece = device.declared_read_bytes(self.read_chunk_bytes) if device is not None else 0
        dst = self._load_rate(name)
        last = min(nbytes, piece or nbytes)
        last_load = last / dst if dst else 0.0
        if not src and not dst:
            return 0.0, 0.0
        slower = max(nbytes / src if src else 0.0, (backlog + nbytes) / dst if dst else 0.0)
        lag = last / max(src, dst) if src and dst else 0.0
        return slower + lag, last_load

    def vmm(self, side: Side) -> Figure:
        """One VMM call on ``side`` (a pause or a resume), as far as it is known."""
        seconds = self.inputs.vmm_s.get(side, self.inputs.vmm_s.get(S))
        if seconds is None:
            return Figure(0.0, "unknown")
        return Figure.of(seconds, "measured (status call)")


_STRENGTH = ("measured", "declared", "history", "estimated", "unknown")


def _weakest(sources: set[str]) -> str:
    """The least sure of ``sources``: a sum is as sure as its weakest term."""
    for source in reversed(_STRENGTH):
        if source in sources:
            return source
    return next(iter(sources), "none")


def _then(
    devices: Mapping[str, DeviceForecast], first: str | None, arcs: str, figures: list[Figure]
) -> Figure:
    """The slowest of ``figures``, or, where the ``first`` device's ``arcs`` go
    before everyone else's, its figure then the slowest of the others'."""
    if first is None or first not in devices:
        return _slowest(figures)
    own: Figure = getattr(devices[first], arcs)
    rest = _slowest([getattr(d, arcs) for n, d in devices.items() if n != first])
    return Figure(round(own.ms + rest.ms, 3), _weakest({own.source, rest.source}))


def _slowest(figures: list[Figure]) -> Figure:
    if not figures:
        return Figure(0.0, "none")
    return max(figures, key=lambda f: f.ms)
