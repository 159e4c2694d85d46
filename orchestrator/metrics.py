"""Prometheus metrics of the orchestrator, in a registry the caller passes in.

``Metrics`` registers every metric in the ``CollectorRegistry`` it is given,
never in prometheus_client's global one, so a daemon exposes its own registry
and each test builds a fresh one.  It is fed from two places:

* live, from the runner's trace: ``observer(migration)`` returns a callback
  for ``Migration.observers`` that times every device transition as it ends;
* once per migration, from its report: ``migration_finished`` records the
  downtime, the duration, the outcome, the phase times, the bytes moved, the
  pre-copy rounds, the barrier waits, the VMMs' vCPU pause and resume times,
  and the device or VMM error that caused a failure.

``orchestrator_migrations_active`` counts the migrations between
``migration_started`` and ``migration_finished``; it is read at scrape time
from the set of migrations in flight, so calling either twice cannot skew it.
A daemon must call ``migration_finished`` however ``run()`` ends, which is
what ``track`` does::

    with metrics.track(migration):
        await migration.run()

or, spelled out::

    metrics.migration_started(migration)
    migration.observers.append(metrics.observer(migration))
    try:
        await migration.run()
    finally:
        # run() sets migration.report even when it re-raises a cancellation.
        metrics.migration_finished(migration.report, migration)

Bytes sent, pre-copy rounds and what pre-copy still has to send move while
migrations run: they are read at scrape time from the migrations in flight
(their recorders) plus what the finished ones counted (``_Live``).

Invariants it keeps:

* Series are bounded: label values come from the project's enums and fixed
  vocabularies (``Outcome``, ``Phase``, ``DeviceState``, the backends, the
  runner's barriers and error kinds), never a migration's or a VM's id.  No
  ``_created`` series.
* The counters alerts use (outcomes, device and VMM errors, bytes) exist from
  construction on, at zero, for the backends this host has, so that a rate or
  an alert on a failure works before the first failure happens; labelled
  histograms appear with their first sample (an idle daemon exposes about 120
  series: ``docs/metrics.md`` says what each family costs).
* Times are in seconds and sizes in bytes, as the metric names say, whatever
  unit the report uses.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, get_args

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator import __version__
from orchestrator.backends import BACKENDS
from orchestrator.flow import Phase
from orchestrator.report import MigrationReport, Outcome
from orchestrator.states import DeviceState, MigrationFlags, arcs

if TYPE_CHECKING:
    from orchestrator.engine import Migration, TraceEvent

OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)

#: Phases the report times: every one but DONE, which ends the clock.
TIMED_PHASES: Final = tuple(p for p in Phase if p is not Phase.DONE)

#: The runner's two P2P barriers (``runner.Barrier`` names).
BARRIERS: Final = ("source_p2p", "destination_p2p")

#: The phases a device's stream bytes move in (``bytes_precopy``, ``bytes_stopcopy``).
BYTES_PHASES: Final = (Phase.PRECOPY, Phase.STOP_COPY)

#: The ``ErrorInfo.kind`` of a failure the runner pins on one device
#: (``Migration._fail``); the other kinds belong to the migration as a whole.
DEVICE_ERROR_KINDS: Final = ("device_error", "device_timeout", "peer_error")

#: The VMM calls a report times (``VmmReport``): (side, action) -> its field.
VMM_ACTIONS: Final = (
    ("source", "pause", "pause_ms"),
    ("destination", "resume", "resume_ms"),
    ("source", "resume", "source_resume_ms"),
)
#: The ``ErrorInfo.kind`` of a failure the runner pins on a VMM.
VMM_ERROR_KINDS: Final = ("vmm_error", "vmm_timeout", "vmm_state")

#: Measured over predicted downtime: a model within 10 % lands in 0.9-1.1.
PREDICTION_BUCKETS: Final = (
    0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 5.0,
)  # fmt: skip
#: A passthrough device is paused for milliseconds when things go well and
#: for tens of seconds when they do not; 30 s is a downtime no plan allows.
DOWNTIME_BUCKETS: Final = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
)  # fmt: skip
#: Whole migrations: seconds for a small device, up to an hour for a large
#: pre-copy over a slow link.
DURATION_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
#: Phases run from a few milliseconds (commit) to minutes (pre-copy).
PHASE_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)  # fmt: skip
#: One arc is one ioctl: tens of microseconds on a simple device, seconds on
#: a GPU that saves its context, up to the default 10 s device call deadline.
TRANSITION_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: A barrier wait is the gap between the first and the last device reaching it.
BARRIER_BUCKETS: Final = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
)  # fmt: skip
#: One QMP stop or cont and its query-status: about a millisecond on a
#: local socket, up to the default 10 s VMM call deadline.
VMM_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Pre-copy rounds per migration; plans cap them (``precopy_max_rounds``).
PRECOPY_ROUND_BUCKETS: Final = (1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 75, 100)
#: Measured downtime over the limit in force: at most 1 is the promise kept.
LIMIT_BUCKETS: Final = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 5.0)


def present_backends() -> tuple[str, ...]:
    """The backends this host has (their devices could be here)."""
    return tuple(sorted(name for name, backend in BACKENDS.items() if backend.present()))


def every_arc() -> tuple[tuple[DeviceState, DeviceState], ...]:
    """Every arc any device may take, whatever its capability flags."""
    found: set[tuple[DeviceState, DeviceState]] = set()
    for extra in range(1 << len(MigrationFlags)):
        flags = MigrationFlags(extra) | MigrationFlags.STOP_COPY
        for start, ends in arcs(flags).items():
            found.update((start, end) for end in ends)
    return tuple(sorted(found))


class Metrics:
    """The orchestrator's metrics, registered in ``registry``.

    ``backends`` are the backend names whose counters are created up front:
    those this host has (``present_backends``) by default.  A device of another
    backend still gets its series, from its first sample on.  ``node`` names
    the host in ``orchestrator_build_info`` (the DaemonSet passes its node's
    name); ``process`` adds the process and Python platform collectors.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        backends: Iterable[str] | None = None,
        node: str = "",
        process: bool = True,
    ) -> None:
        # Counters' and histograms' _created series double what an idle daemon
        # exposes and no dashboard reads them.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        known_backends = tuple(sorted(present_backends() if backends is None else backends))
        self._active: dict[str, Migration] = {}
        Info(
            "orchestrator_build",
            "The daemon's version, its Python and the node it runs on (the deployment's "
            "name for the host): join on instance to filter by node.",
            registry=registry,
        ).info({"version": __version__, "python": platform.python_version(), "node": node})
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.live = _Live(self._active, known_backends)
        registry.register(self.live)

        self.downtime = Histogram(
            "orchestrator_migration_downtime_seconds",
            "Time the VM's devices were stopped: from the first source device stopping to "
            "the last destination device running (after a rollback, to the last source "
            "device running again).",
            registry=registry,
            buckets=DOWNTIME_BUCKETS,
        )
        self.prediction = Histogram(
            "orchestrator_downtime_prediction_ratio",
            "Measured downtime over the downtime predicted at the switchover decision: "
            "how far the model can be trusted (1 is exact).",
            registry=registry,
            buckets=PREDICTION_BUCKETS,
        )
        self.limit_ratio = Histogram(
            "orchestrator_downtime_limit_ratio",
            "Measured downtime over the downtime limit in force: at most 1 is the promise "
            "kept; the share of migrations above 1 is the share that broke it.",
            registry=registry,
            buckets=LIMIT_BUCKETS,
        )
        self.budget_rollbacks = Counter(
            "orchestrator_downtime_budget_rollbacks_total",
            "Migrations a strict downtime budget rolled back, by the step before which "
            "(or watchdog: during which) the pause would have passed its limit.",
            ["step"],
            registry=registry,
        )
        self.duration = Histogram(
            "orchestrator_migration_duration_seconds",
            "Wall time of a whole migration, from start to its report.",
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self.migrations = Counter(
            "orchestrator_migrations_total",
            f"Migrations finished, by outcome ({', '.join(OUTCOMES)}); only failed needs an "
            "operator.",
            ["outcome"],
            registry=registry,
        )
        self.active = Gauge(
            "orchestrator_migrations_active",
            "Migrations started and not yet finished.",
            registry=registry,
        )
        self.active.set_function(lambda: len(self._active))
        self.in_doubt = Gauge(
            "orchestrator_migrations_in_doubt",
            "Migrations between two hosts whose end waits on the other host's daemon, which "
            "cannot be reached: an operator may settle them (orchestrator settle).",
            registry=registry,
        )
        #: Counts this host's migrations in doubt (the service's, set by its owner).
        self.count_in_doubt: Callable[[], int] = lambda: 0
        self.in_doubt.set_function(lambda: self.count_in_doubt())
        self.phase_time = Histogram(
            "orchestrator_migration_phase_seconds",
            "Time a migration spent in each phase.",
            ["phase"],
            registry=registry,
            buckets=PHASE_BUCKETS,
        )
        self.transition = Histogram(
            "orchestrator_device_transition_seconds",
            "Time one device took for one arc of the migration state machine, "
            "source and destination alike.",
            ["backend", "from_state", "to_state"],
            registry=registry,
            buckets=TRANSITION_BUCKETS,
        )
        self.precopy_rounds = Histogram(
            "orchestrator_precopy_rounds",
            "Pre-copy rounds a migration took before its switchover decision.",
            registry=registry,
            buckets=PRECOPY_ROUND_BUCKETS,
        )
        self.barrier_wait = Histogram(
            "orchestrator_barrier_wait_seconds",
            "Time one device waited at a P2P barrier for the other devices of its side.",
            ["barrier"],
            registry=registry,
            buckets=BARRIER_BUCKETS,
        )
        self.device_errors = Counter(
            "orchestrator_device_errors_total",
            "Migrations whose first failure was a device's (device_error, device_timeout "
            "or peer_error), by that device's backend.",
            ["backend", "kind"],
            registry=registry,
        )

        self.vmm_time = Histogram(
            "orchestrator_vmm_seconds",
            "Time a VMM took to pause the source vCPUs or resume the destination ones (or, "
            "after a rollback, the source ones), its check included: the VMM's share of the "
            "downtime.",
            ["side", "action"],
            registry=registry,
            buckets=VMM_BUCKETS,
        )
        self.vmm_errors = Counter(
            "orchestrator_vmm_errors_total",
            "Migrations whose first failure was a VMM's (vmm_error, vmm_timeout, or vmm_state: "
            "vCPUs not where a migration starts), by side.",
            ["side", "kind"],
            registry=registry,
        )

        # The counters alerts and rates read, at zero; histograms with labels
        # appear with their first sample (each label set costs ~20 series).
        for outcome in OUTCOMES:
            self.migrations.labels(outcome)
        for side in ("source", "destination"):
            for kind in VMM_ERROR_KINDS:
                self.vmm_errors.labels(side, kind)
        for backend in known_backends:
            for kind in DEVICE_ERROR_KINDS:
                self.device_errors.labels(backend, kind)

    # -- live ----------------------------------------------------------------

    def observer(self, migration: Migration) -> Callable[[TraceEvent], None]:
        """A callback for ``migration.observers`` that times each device arc as it ends."""
        backend_of = {d.name: d.backend.name for d in migration.resolved.devices}
        transition = self.transition

        def record(event: TraceEvent) -> None:
            # Called on the runner's hot path: everything but arc_end returns at once.
            if event.kind != "arc_end":
                return
            if event.device is None or event.from_state is None or event.to_state is None:
                return
            transition.labels(
                backend_of.get(event.device, "unknown"),
                event.from_state.name,
                event.to_state.name,
            ).observe(event.detail["duration_s"])

        return record

    def migration_started(self, migration: Migration) -> None:
        """Count ``migration`` as active until ``migration_finished``."""
        self._active[migration.id] = migration

    def migration_finished(self, report: MigrationReport | None, migration: Migration) -> None:
        """``migration`` is over: no longer active, and its report (if any) recorded.

        Call it exactly once per report, also when ``run()`` raised
        (``report`` is then ``migration.report``, or None if there is none).
        """
        if self._active.pop(migration.id, None) is not None:
            self.live.settle(migration)
        if report is not None:
            self.record_report(report)

    @contextlib.contextmanager
    def track(self, migration: Migration) -> Iterator[None]:
        """Observe ``migration`` and record its report when the block ends, however."""
        self.migration_started(migration)
        migration.observers.append(self.observer(migration))
        try:
            yield
        finally:
            self.migration_finished(migration.report, migration)

    # -- from the report -------------------------------------------------------

    def record_report(self, report: MigrationReport) -> None:
        """Everything a finished migration's report tells, in seconds and bytes."""
        self.migrations.labels(report.outcome).inc()
        self.duration.observe(report.duration_ms / 1000)
        if report.downtime_ms is not None:
            self.downtime.observe(report.downtime_ms / 1000)
            limit = report.precopy.downtime_limit_ms
            if limit:
                self.limit_ratio.observe(report.downtime_ms / limit)
            predicted = report.precopy.expected_downtime_ms
            if report.committed and predicted:
                self.prediction.observe(report.downtime_ms / predicted)
        if report.budget is not None and report.budget.get("blown_at"):
            self.budget_rollbacks.labels(str(report.budget["blown_at"])).inc()
        for phase, ms in report.phases.items():
            self.phase_time.labels(phase).observe(ms / 1000)
        # A migration that never reached pre-copy took no rounds worth counting.
        if Phase.PRECOPY.value in report.phases:
            self.precopy_rounds.observe(report.precopy.rounds)
        backend_of: dict[str, str] = {}
        for device in report.devices:
            backend_of[device.name] = device.backend
            for barrier, ms in device.barrier_wait_ms.items():
                self.barrier_wait.labels(barrier).observe(ms / 1000)
        if report.vmm is not None:
            for side, action, field in VMM_ACTIONS:
                ms = getattr(report.vmm, field)
                if ms is not None:
                    self.vmm_time.labels(side, action).observe(ms / 1000)
        error = report.error
        if error is not None and error.device is not None:
            self.device_errors.labels(backend_of.get(error.device, "unknown"), error.kind).inc()
        elif error is not None and error.kind in VMM_ERROR_KINDS and error.side is not None:
            self.vmm_errors.labels(error.side, error.kind).inc()


class _Live(Collector):
    """What moves while migrations run, read at scrape time: bytes sent and pre-copy
    rounds (counters: the finished migrations' totals plus the ones in flight so
    far) and what the migrations in flight still have to send (gauges)."""

    def __init__(self, active: Mapping[str, Migration], backends: Iterable[str]) -> None:
        self._active = active
        self._bytes: dict[tuple[str, str], int] = {
            (backend, phase.value): 0 for backend in backends for phase in BYTES_PHASES
        }
        self._rounds = 0

    def settle(self, migration: Migration) -> None:
        """``migration`` left the active set: what it counted stays counted."""
        for key, nbytes in _bytes_of(migration).items():
            self._bytes[key] = self._bytes.get(key, 0) + nbytes
        self._rounds += migration.recorder.precopy.rounds

    def collect(self) -> Iterator[Metric]:
        sent = dict(self._bytes)
        rounds = self._rounds
        precopy_left = stop_copy = 0
        for migration in list(self._active.values()):
            for key, nbytes in _bytes_of(migration).items():
                sent[key] = sent.get(key, 0) + nbytes
            rounds += migration.recorder.precopy.rounds
            for stats in migration.recorder.stats.values():
                if stats.remaining is not None:
                    precopy_left += stats.remaining.initial_bytes + stats.remaining.dirty_bytes
                    stop_copy += stats.remaining.stop_copy_bytes
        family = CounterMetricFamily(
            "orchestrator_device_bytes",
            "Bytes of device migration streams sent, by the phase they moved in "
            "(precopy while the VM runs, stop_copy while it is stopped), counted as "
            "they are sent.",
            labels=["backend", "phase"],
        )
        for (backend, phase), nbytes in sorted(sent.items()):
            family.add_metric([backend, phase], nbytes)
        yield family
        yield CounterMetricFamily(
            "orchestrator_precopy_rounds_completed",
            "Pre-copy rounds completed, counted as each ends.",
            value=rounds,
        )
        yield GaugeMetricFamily(
            "orchestrator_precopy_remaining_bytes",
            "What the migrations in flight still have to send in pre-copy (initial and "
            "dirty bytes), as their devices last reported it.",
            value=precopy_left,
        )
        yield GaugeMetricFamily(
            "orchestrator_stop_copy_bytes",
            "What the migrations in flight would send with their devices stopped, were "
            "they to switch over now, as their devices last reported it.",
            value=stop_copy,
        )

    def describe(self) -> Iterator[Metric]:
        # Names only, so that registering checks them against the others' at once.
        return self.collect()


def _bytes_of(migration: Migration) -> dict[tuple[str, str], int]:
    backend_of = {d.name: d.backend.name for d in migration.resolved.devices}
    sent: dict[tuple[str, str], int] = {}
    for name, stats in migration.recorder.stats.items():
        backend = backend_of.get(name, "unknown")
        for phase, nbytes in (
            (Phase.PRECOPY.value, stats.bytes_precopy),
            (Phase.STOP_COPY.value, stats.bytes_stopcopy),
        ):
            sent[(backend, phase)] = sent.get((backend, phase), 0) + nbytes
    return sent
