"""Does the downtime promise hold?  Measured downtime against the model's prediction.

A seeded matrix of simulated migrations, drawn log-spread: 1 to 64 devices,
arcs (``transition_ms``) from 0.1 to 100 ms, dirty rates from 0 to 90% of
the bottleneck, with and without pre-copy, and a ``downtime_limit_ms`` drawn
around a rough estimate of each configuration's window (from half of it to
four times it), so that some can meet their limit and some cannot.  Each
configuration runs on one host (the engine in this process, devices in
memory) and between two daemons (``orchestrator serve`` processes on the
loopback, ``tests/two_daemons.py``), under every policy: ``precopy_policy``
abort and switchover, and ``downtime_policy`` best_effort and strict.

The bottleneck is the one the devices' bytes really meet:

* ``plan``: the plan's ``bandwidth_limit_mib_s`` (one rate limiter shared by
  every device's stream, on one host and between two hosts alike); the
  devices read and load at memory speed;
* ``device``: each device's own ``drain_mib_s`` (its source produces and its
  destination loads its stream no faster), with no plan limit; the rate of
  the whole VM is then the devices' rates together.

The dirty rate is a fraction of that bottleneck, spread evenly over the devices.

For every policy it prints, per placement: the ratio of measured to
predicted downtime (``report.downtime_ms`` over
``report.precopy.expected_downtime_ms``, the prediction at the switchover
decision) for the migrations that switched over and succeeded; how many
migrations kept their limit; and, under strict, the worst pause against the
limit.  The targets stand beside each figure.  Where one is missed, the
trials that miss it worst are listed with the forecast's components beside
the phases the switchover measured, and a table of each component's error
over all the trials says which part of the model is off.

Last, the downtime distribution of the shipped example plans in
``config/plans/`` that run on the simulated backend here, on one host.

    python bench/downtime_promise.py [--seed 7] [--trials 64] [--quick]
        [--placements one-host,two-daemons] [--plan-runs 20] [--worst 5]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # The two-daemon harness lives with the tests (python bench/... puts bench/ first).
    sys.path.insert(0, str(ROOT))

from orchestrator import logs  # noqa: E402
from orchestrator.engine import Migration  # noqa: E402
from orchestrator.errors import PlanError  # noqa: E402
from orchestrator.plan import Plan, parse_plan, read_plan_data  # noqa: E402
from orchestrator.resolve import resolve  # noqa: E402

Placement = Literal["one host", "two daemons"]
PLACEMENTS: dict[str, Placement] = {"one-host": "one host", "two-daemons": "two daemons"}
PRECOPY_POLICIES = ("abort", "switchover")
#: The downtime policies to run.  ``strict`` (roll back at once when the pause so
#: far plus the predicted rest would overrun the limit) is on another branch:
#: :func:`policies` drops it while the plan model has no ``downtime_policy``.
DOWNTIME_POLICIES = ("best_effort", "strict")
#: The forecast's components, in the window's order.
COMPONENTS = (
    "pause", "grace_arcs", "stop_arcs", "transfer", "settle_arcs", "commit", "control",
    "run_arcs", "resume", "overhead",
)  # fmt: skip
#: The phases inside the window (without a VMM it opens with the first source stop).
WINDOW_PHASES = ("stop_copy", "destination_grace", "commit", "resume")
#: Which components each phase of the window holds, for the error table; control
#: and overhead fall across phases and are shown on their own.
PHASE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "stop_copy": ("stop_arcs", "transfer"),
    "destination_grace": ("settle_arcs",),
    "commit": ("commit",),
    "resume": ("run_arcs", "resume"),
}
MIB = 1 << 20


@dataclass(frozen=True)
class Policy:
    precopy: str
    downtime: str

    @property
    def label(self) -> str:
        return f"{self.precopy}/{self.downtime}"


def strict_available() -> bool:
    return "downtime_policy" in Plan.model_fields


def policies() -> tuple[list[Policy], str | None]:
    """Every policy this build has, and a note on any it lacks."""
    downtime = list(DOWNTIME_POLICIES)
    note = None
    if not strict_available():
        downtime = [d for d in downtime if d != "strict"]
        note = "strict: skipped, this build's plan has no downtime_policy (best_effort runs alone)"
    return [Policy(p, d) for p in PRECOPY_POLICIES for d in downtime], note


# -- the matrix -------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One configuration of the matrix; every placement and policy runs it."""

    index: int
    devices: int
    state_kib: int  # each device's
    transition_ms: float
    bottleneck: Literal["plan", "device"]
    bandwidth_mib_s: float  # the bottleneck's, for the whole VM
    dirty_fraction: float  # of the bandwidth, all devices together
    pre_copy: bool
    limit_ms: float

    @property
    def dirty_mib_s(self) -> float:
        """Each device's dirty rate."""
        return round(self.dirty_fraction * self.bandwidth_mib_s / self.devices, 4)

    def describe(self) -> str:
        return (
            f"#{self.index}: {self.devices} dev x {self.state_kib} KiB, arcs "
            f"{self.transition_ms:g} ms, {self.bottleneck} bottleneck "
            f"{self.bandwidth_mib_s:g} MiB/s, dirty {self.dirty_fraction:.0%} "
            f"({self.dirty_mib_s:g} MiB/s each), pre-copy {'yes' if self.pre_copy else 'no'}, "
            f"limit {self.limit_ms:g} ms"
        )


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def rough_window_ms(devices: int, state_kib: int, transition_ms: float, bandwidth: float,
                    dirty_fraction: float, pre_copy: bool) -> float:  # fmt: skip
    """A rough guess of the window, only to place the limits around it (not the model).

    Stop (1 arc with pre-copy, 2 without), the destination's settle (2) and run
    (1); 0.3 ms of the orchestrator's work a device; the state without
    pre-copy, or with it what the devices dirty over the arcs and one last round.
    """
    arcs = (4 if pre_copy else 5) * transition_ms
    total_mib = devices * state_kib / 1024
    if pre_copy:
        dirty_mib = dirty_fraction * bandwidth * (arcs + 20) / 1000
        stop_mib = min(total_mib, dirty_mib)
    else:
        stop_mib = total_mib
    return arcs + 0.3 * devices + stop_mib / bandwidth * 1000


def draw_matrix(seed: int, trials: int, *, quick: bool = False) -> list[Config]:
    """``trials`` configurations drawn from ``seed``: the same seed, the same matrix."""
    rng = random.Random(seed)
    max_total_mib = 4.0 if quick else 16.0
    configs = []
    for index in range(trials):
        # Half on the powers of two, so that 1 and 64 themselves come up.
        if rng.random() < 0.5:
            devices = rng.choice((1, 2, 4, 8, 16, 32, 64))
        else:
            devices = min(64, max(1, round(_log_uniform(rng, 1, 64))))
        total_mib = _log_uniform(rng, 0.25, max_total_mib)
        # Whole 4 KiB pages, at least 16 of them a device.
        state_kib = max(64, round(total_mib * 1024 / devices / 4) * 4)
        transition_ms = round(_log_uniform(rng, 0.1, 100), 2)
        bottleneck: Literal["plan", "device"] = "device" if rng.random() < 1 / 3 else "plan"
        bandwidth = round(_log_uniform(rng, 32, 256))
        dirty_fraction = round(rng.uniform(0, 0.9), 3)
        pre_copy = rng.random() < 0.7
        estimate = rough_window_ms(
            devices, state_kib, transition_ms, bandwidth, dirty_fraction, pre_copy
        )
        limit_ms = round(max(1.0, estimate * _log_uniform(rng, 0.5, 4)), 1)
        configs.append(
            Config(
                index,
                devices,
                state_kib,
                transition_ms,
                bottleneck,
                bandwidth,
                dirty_fraction,
                pre_copy,
                limit_ms,
            )
        )
    return configs


def plan_for(
    config: Config, policy: Policy, tag: str, destination: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The plan of one trial; ``tag`` makes its device names its own (a daemon's
    simulated devices persist under their names)."""
    source: dict[str, Any] = {
        "state_mib": config.state_kib / 1024,
        "dirty_mib_s": config.dirty_mib_s,
        "transition_ms": config.transition_ms,
        "pre_copy": config.pre_copy,
    }
    target: dict[str, Any] = {"transition_ms": config.transition_ms}
    if config.bottleneck == "device":
        each = round(config.bandwidth_mib_s / config.devices, 4)
        source["drain_mib_s"] = target["drain_mib_s"] = each
    plan: dict[str, Any] = {
        "vm": f"promise-{tag}",
        "downtime_limit_ms": config.limit_ms,
        "precopy_policy": policy.precopy,
        "timeouts": {"precopy_s": 10, "switchover_s": 60},
        "devices": [
            {
                "name": f"{tag}-d{i}",
                "backend": "simulated",
                "source": {**source, "seed": config.index * 100 + i},
                "destination": dict(target),
            }
            for i in range(config.devices)
        ],
    }
    if config.bottleneck == "plan":
        plan["bandwidth_limit_mib_s"] = config.bandwidth_mib_s
    if strict_available():
        plan["downtime_policy"] = policy.downtime
    if destination is not None:
        plan["destination"] = destination
    return plan


# -- one trial's result -----------------------------------------------------------------


@dataclass
class Trial:
    config: Config
    placement: Placement
    policy: Policy
    outcome: str
    downtime_ms: float | None
    predicted_ms: float | None
    decision: str | None
    converged: bool
    error: str | None
    phases: dict[str, float]
    #: The forecast's components (ms; None: infinite or absent).
    components: dict[str, float | None]
    predicted_stop_bytes: int | None
    stop_bytes: int
    bandwidth_mib_s: float | None
    rounds: int

    @classmethod
    def of(
        cls, config: Config, placement: Placement, policy: Policy, report: dict[str, Any]
    ) -> Trial:
        precopy = report.get("precopy") or {}
        forecast = precopy.get("forecast") or {}
        devices = forecast.get("devices") or {}
        error = report.get("error")
        return cls(
            config=config,
            placement=placement,
            policy=policy,
            outcome=report["outcome"],
            downtime_ms=report.get("downtime_ms"),
            predicted_ms=precopy.get("expected_downtime_ms"),
            decision=precopy.get("decision"),
            converged=bool(precopy.get("converged")),
            error=f"{error['kind']}: {error['message']}" if error else None,
            phases=dict(report.get("phases") or {}),
            components={k: v.get("ms") for k, v in (forecast.get("components") or {}).items()},
            predicted_stop_bytes=(
                sum(d["stop_bytes"] for d in devices.values()) if devices else None
            ),
            stop_bytes=sum(d.get("bytes_stopcopy", 0) for d in report.get("devices") or []),
            bandwidth_mib_s=precopy.get("bandwidth_mib_s"),
            rounds=int(precopy.get("rounds") or 0),
        )

    @classmethod
    def stuck(
        cls, config: Config, policy: Policy, status: dict[str, Any], incoming: dict[str, Any]
    ) -> Trial:
        """A trial between two daemons that had no outcome after ``STUCK_S``."""
        where = (
            f"no outcome after {STUCK_S:g} s: the source in phase {status.get('phase')} "
            f"(committed {status.get('committed')}), the destination {incoming.get('phase')}, "
            f"outcome {incoming.get('outcome')}"
        )
        return cls(config, "two daemons", policy, "stuck", None, None, None, False, where,
                   {}, {}, None, 0, None, 0)  # fmt: skip

    @property
    def category(self) -> str:
        """succeeded, over (the limit, by 5% or less), over5, aborted, rolled_back, failed,
        stuck."""
        if self.outcome == "succeeded":
            excess = self.excess
            if excess is None or excess <= 1.0:
                return "succeeded"
            return "over5" if excess > 1.05 else "over"
        if self.outcome == "refused" or (
            self.outcome == "rolled_back" and self.decision == "abort"
        ):
            return "aborted"
        return self.outcome

    @property
    def excess(self) -> float | None:
        """The pause the VM saw over its limit (a rollback's pause too)."""
        if self.downtime_ms is None:
            return None
        return self.downtime_ms / self.config.limit_ms

    @property
    def ratio(self) -> float | None:
        """Measured over predicted, for a migration that switched over and succeeded."""
        if (
            self.outcome != "succeeded"
            or self.decision != "switchover"
            or self.downtime_ms is None
            or not self.predicted_ms
        ):
            return None
        return self.downtime_ms / self.predicted_ms


# -- running ------------------------------------------------------------------------


def progress(mark: str = ".") -> None:
    sys.stderr.write(mark)
    sys.stderr.flush()


def run_one_host(
    configs: Sequence[Config], policy_axis: Sequence[Policy], on_trial: Callable[[], None]
) -> list[Trial]:
    """Every configuration and policy in this process: the engine with in-memory devices."""
    trials = []
    for config in configs:
        for p, policy in enumerate(policy_axis):
            plan = plan_for(config, policy, f"t{config.index}p{p}")
            report = trio.run(Migration(resolve(parse_plan(plan))).run)
            trials.append(Trial.of(config, "one host", policy, report.model_dump(mode="json")))
            on_trial()
    return trials


#: How long a trial between two daemons may take before it counts as stuck (a
#: healthy one of this matrix ends within 15 s: pre-copy's deadline is 10 s).
STUCK_S = 30.0


async def _run_two_daemons(
    configs: Sequence[Config], policy_axis: Sequence[Policy], on_trial: Callable[[], None]
) -> list[Trial]:
    from tests.conftest import TOKEN
    from tests.two_daemons import ended, two_daemons, until

    trials: list[Trial] = []
    work = [(config, p, policy) for config in configs for p, policy in enumerate(policy_axis)]
    base = Path(tempfile.mkdtemp(prefix="orch-promise-"))  # short: socket paths
    try:
        token_file = base / "tokens"
        token_file.write_text(f"{TOKEN}\n")
        token_file.chmod(0o600)
        pair = 0
        while work:
            # A fresh pair of daemons; again after a stuck trial, so that what it
            # left running weighs on no later trial.
            pair += 1
            (base / f"pair{pair}").mkdir()
            async with two_daemons(base / f"pair{pair}", token_file, processes=True) as (
                source,
                destination,
            ):
                target = {"url": destination.api_url, "token_file": str(token_file)}
                while work:
                    config, p, policy = work.pop(0)
                    tag = f"t{config.index}p{p}"
                    migration_id = await source.submit(plan_for(config, policy, tag, target))
                    try:
                        status = await until(
                            functools.partial(source.status, migration_id), ended, seconds=STUCK_S
                        )
                    except trio.TooSlowError:
                        status = await source.status(migration_id)
                        incoming = await destination.incoming(migration_id)
                        trials.append(Trial.stuck(config, policy, status, incoming))
                        on_trial()
                        break
                    trials.append(Trial.of(config, "two daemons", policy, status["report"]))
                    # The daemons keep their simulated devices in files; these are done with.
                    for host in (source, destination):
                        for path in (host.base / "state" / "simulated").glob(f"*/{tag}-*"):
                            path.unlink(missing_ok=True)
                    on_trial()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return trials


def run_two_daemons(
    configs: Sequence[Config], policy_axis: Sequence[Policy], on_trial: Callable[[], None]
) -> list[Trial]:
    """Every configuration and policy between two ``orchestrator serve`` processes."""
    return trio.run(_run_two_daemons, configs, policy_axis, on_trial)


# -- summaries ------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile, linearly interpolated between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Target:
    """A promise: a figure, its bounds, and whether it held."""

    what: str
    value: float
    low: float
    high: float
    n: int

    @property
    def met(self) -> bool | None:
        if self.n == 0 or math.isnan(self.value):
            return None
        return self.low <= self.value <= self.high

    def verdict(self) -> str:
        met = self.met
        return "n/a (no trials)" if met is None else ("met" if met else "MISSED")


#: p90 and p99 bounds of measured/predicted, by placement.
RATIO_TARGETS: dict[Placement, dict[float, tuple[float, float]]] = {
    "one host": {0.9: (0.9, 1.1), 0.99: (0.8, 1.25)},
    "two daemons": {0.9: (0.85, 1.15)},
}
#: Under strict, no pause above the limit by more than this.
STRICT_EXCESS = 1.05
#: With abort and a converged decision, the share of migrations over the limit.
ABORT_OVER_SHARE = 0.01


@dataclass
class Row:
    """The figures of one (policy, placement)."""

    policy: Policy
    placement: Placement
    trials: list[Trial]
    ratios: list[float] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.policy.label} | {self.placement}"


def summarize(trials: Sequence[Trial], policy_axis: Sequence[Policy]) -> list[Row]:
    rows = []
    for policy in policy_axis:
        for placement in ("one host", "two daemons"):
            mine = [t for t in trials if t.policy == policy and t.placement == placement]
            if not mine:
                continue
            row = Row(policy, placement, mine)
            row.ratios = [r for t in mine if (r := t.ratio) is not None]
            for q, (low, high) in RATIO_TARGETS[placement].items():
                row.targets.append(
                    Target(
                        f"p{q * 100:g} measured/predicted",
                        quantile(row.ratios, q),
                        low,
                        high,
                        len(row.ratios),
                    )
                )
            if policy.downtime == "strict":
                paused = [e for t in mine if (e := t.excess) is not None]
                row.targets.append(
                    Target(
                        "worst pause/limit",
                        max(paused, default=math.nan),
                        0.0,
                        STRICT_EXCESS,
                        len(paused),
                    )
                )
            if policy.precopy == "abort":
                converged = [t for t in mine if t.converged and t.outcome == "succeeded"]
                over = sum(1 for t in converged if (t.excess or 0.0) > 1.0)
                share = over / len(converged) if converged else math.nan
                row.targets.append(
                    Target(
                        "converged: share over the limit",
                        share,
                        0.0,
                        ABORT_OVER_SHARE,
                        len(converged),
                    )
                )
            rows.append(row)
    return rows


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def print_ratio_table(rows: Sequence[Row]) -> None:
    print("\n## Measured / predicted downtime (switched over and succeeded)\n")
    print("| policy | placement | N | p50 | p90 | p99 | worst high | worst low | targets |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        r = row.ratios
        targets = "; ".join(
            f"{t.what.split()[0]} in {t.low:g}-{t.high:g}: {t.verdict()}"
            for t in row.targets
            if "measured/predicted" in t.what
        )
        print(
            f"| {row.policy.label} | {row.placement} | {len(r)} | {_f(quantile(r, 0.5))} "
            f"| {_f(quantile(r, 0.9))} | {_f(quantile(r, 0.99))} | {_f(max(r, default=None))} "
            f"| {_f(min(r, default=None))} | {targets} |"
        )


def print_count_table(rows: Sequence[Row]) -> None:
    print("\n## Outcomes and the limit\n")
    print(
        "| policy | placement | N | succeeded within | succeeded over limit | of them >5% over "
        "| aborted/refused | rolled back | failed | stuck | converged: over limit (target <=1%) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        cats = [t.category for t in row.trials]
        over = cats.count("over") + cats.count("over5")
        abort_target = next((t for t in row.targets if t.what.startswith("converged")), None)
        abort_cell = "-"
        if abort_target is not None:
            abort_cell = f"{_f(abort_target.value * 100, 1)}% of {abort_target.n}: "
            abort_cell += abort_target.verdict()
        print(
            f"| {row.policy.label} | {row.placement} | {len(cats)} | {cats.count('succeeded')} "
            f"| {over} | {cats.count('over5')} | {cats.count('aborted')} "
            f"| {cats.count('rolled_back')} | {cats.count('failed')} | {cats.count('stuck')} "
            f"| {abort_cell} |"
        )


def print_stuck(trials: Sequence[Trial]) -> None:
    stuck = [t for t in trials if t.outcome == "stuck"]
    if stuck:
        print(f"\nstuck ({len(stuck)}; their daemons were replaced by a fresh pair):")
        for t in stuck:
            print(f"- {t.config.describe()}; {t.policy.label}: {t.error}")


def print_strict_table(rows: Sequence[Row], note: str | None) -> None:
    print("\n## Strict: the worst pause against the limit\n")
    strict = [r for r in rows if r.policy.downtime == "strict"]
    if not strict:
        print(f"({note})" if note else "(no strict trials)")
        return
    print(
        "| policy | placement | pauses | worst pause/limit | over by >5% | target | trial "
        "(the pause is report.downtime_ms: a rollback's pause too) |"
    )
    print("|---|---|---:|---:|---:|---|---|")
    for row in strict:
        target = next(t for t in row.targets if t.what == "worst pause/limit")
        paused = [t for t in row.trials if t.excess is not None]
        worst = max(paused, key=lambda t: t.excess or 0.0, default=None)
        n_over = sum(1 for t in paused if (t.excess or 0.0) > STRICT_EXCESS)
        print(
            f"| {row.policy.label} | {row.placement} | {target.n} | {_f(target.value)} "
            f"| {n_over} | <= {STRICT_EXCESS:g}: {target.verdict()} "
            f"| {worst.config.describe() if worst else '-'} |"
        )


# -- diagnostics ----------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def trial_detail(t: Trial) -> list[str]:
    """One trial: its parameters, and each phase of the window beside what the
    forecast gave it."""
    head = (
        f"- {t.config.describe()}; {t.policy.label}, {t.placement}: {t.outcome}"
        f"{' (' + t.error + ')' if t.error else ''}; decision {t.decision} "
        f"(converged {t.converged}, {t.rounds} round(s), bandwidth {t.bandwidth_mib_s} MiB/s); "
        f"measured {_ms(t.downtime_ms)} ms, predicted {_ms(t.predicted_ms)} ms"
        f"{', ratio ' + _f(t.ratio) if t.ratio is not None else ''}"
    )
    return [head, *window_lines(t)]


def window_lines(t: Trial) -> list[str]:
    """The window's phases beside the forecast's components, and the bytes."""
    c = t.components
    cells = []
    for phase, comps in PHASE_COMPONENTS.items():
        predicted = sum(c.get(k) or 0.0 for k in comps)
        cells.append(f"{phase} {_ms(t.phases.get(phase))} vs {'+'.join(comps)} {predicted:.2f}")
    other = ", ".join(
        f"{k} {_ms(c.get(k))}" for k in ("control", "overhead", "pause", "grace_arcs") if c.get(k)
    )
    return [
        f"    phases (ms) vs forecast: {'; '.join(cells)}; beside them {other or 'none'}",
        f"    stop-copy bytes: predicted {t.predicted_stop_bytes}, sent {t.stop_bytes}"
        f"; transfer predicted {_ms(c.get('transfer'))} ms",
    ]


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 3 or len(set(xs)) < 2:
        return None
    return statistics.linear_regression(xs, ys).slope


#: The subsets the error table is shown for: a component off for one kind of
#: bottleneck only is lost in the whole.
SUBSETS: dict[str, Callable[[Trial], bool]] = {
    "every trial": lambda t: True,
    "plan bottleneck": lambda t: t.config.bottleneck == "plan",
    "device bottleneck": lambda t: t.config.bottleneck == "device",
}


def print_component_errors(trials: Sequence[Trial], placement: Placement, subset: str) -> None:
    """Each phase of the window against the components the forecast gave it, over
    every trial that switched over and succeeded: which part of the model is off."""
    keep = SUBSETS[subset]
    mine = [t for t in trials if t.placement == placement and t.ratio is not None and keep(t)]
    if len(mine) < 3:
        return
    print(
        f"\n### Where the error is, {placement}, {subset}: measured - predicted, ms "
        f"({len(mine)} trials)\n"
    )
    print(
        "| phase | its components | predicted p50 | measured p50 | error p50 | error p90 "
        "| error per device (slope) | error per arc ms (slope) | error per predicted transfer ms |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    n = [float(t.config.devices) for t in mine]
    arcs = [t.config.transition_ms for t in mine]
    transfer = [t.components.get("transfer") or 0.0 for t in mine]
    groups: list[tuple[str, str, Callable[[Trial], float], Callable[[Trial], float]]] = [
        (phase, "+".join(comps),
         lambda t, comps=comps: sum(t.components.get(k) or 0.0 for k in comps),  # type: ignore[misc]
         lambda t, phase=phase: t.phases.get(phase, 0.0))  # type: ignore[misc]
        for phase, comps in PHASE_COMPONENTS.items()
    ]  # fmt: skip
    groups.append(
        (
            "whole window",
            "all (control, overhead too)",
            lambda t: t.predicted_ms or 0.0,
            lambda t: t.downtime_ms or 0.0,
        )
    )
    for name, comps, predicted, measured in groups:
        p = [predicted(t) for t in mine]
        m = [measured(t) for t in mine]
        err = [b - a for a, b in zip(p, m, strict=True)]
        print(
            f"| {name} | {comps} | {_ms(quantile(p, 0.5))} | {_ms(quantile(m, 0.5))} "
            f"| {_ms(quantile(err, 0.5))} | {_ms(quantile(err, 0.9))} | {_ms(_slope(n, err))} "
            f"| {_ms(_slope(arcs, err))} | {_ms(_slope(transfer, err))} |"
        )
    byte_err = [
        (t.stop_bytes - t.predicted_stop_bytes) / t.predicted_stop_bytes
        for t in mine
        if t.predicted_stop_bytes
    ]
    print(
        f"\nstop-copy bytes sent / predicted - 1: p50 {_f(quantile(byte_err, 0.5))}, "
        f"p90 {_f(quantile(byte_err, 0.9))} over {len(byte_err)} trials with bytes predicted"
    )
    rest = [(t.downtime_ms or 0.0) - sum(t.phases.get(p, 0.0) for p in WINDOW_PHASES) for t in mine]
    print(
        f"window - its phases (the stretch before the first phase's clock): "
        f"p50 {_ms(quantile(rest, 0.5))} ms, p90 {_ms(quantile(rest, 0.9))} ms"
    )


def print_misses(rows: Sequence[Row], worst: int) -> None:
    print("\n## Missed targets: the trials that miss worst\n")
    any_missed = False
    for row in rows:
        for target in row.targets:
            if target.met is not False:
                continue
            any_missed = True
            print(
                f"### {row.label}: {target.what} = {_f(target.value)}, target "
                f"{target.low:g}-{target.high:g}\n"
            )
            pick: list[Trial]
            if "measured/predicted" in target.what:
                ranked = [t for t in row.trials if t.ratio is not None]
                high = target.value > target.high
                ranked.sort(key=lambda t: t.ratio or 0.0, reverse=high)
                pick = ranked[:worst]
            else:
                over = [t for t in row.trials if t.excess is not None]
                if target.what.startswith("converged"):
                    over = [t for t in over if t.converged and t.outcome == "succeeded"]
                pick = sorted(over, key=lambda t: t.excess or 0.0, reverse=True)[:worst]
            for t in pick:
                print("\n".join(trial_detail(t)))
            print()
    if not any_missed:
        print("(none)")


# -- the shipped plans ---------------------------------------------------------------------


#: The shipped plans' runs are no configuration of the matrix: placeholders.
SHIPPED = Config(-1, 0, 0, 0.0, "plan", 0.0, 0.0, True, 0.0)
SHIPPED_POLICY = Policy("(the plan's)", "(the plan's)")


def shipped_plans(runs: int, directory: Path = ROOT / "config" / "plans") -> None:
    print(f"\n## Shipped example plans ({directory.relative_to(ROOT)}), one host, N = {runs}\n")
    print(
        "| plan | N | outcome | downtime p50 ms | p99 ms | worst ms | predicted p50 ms | limit ms |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    details: list[str] = []
    for path in sorted(directory.glob("*.toml")):
        try:
            resolved = resolve(parse_plan(read_plan_data(path)))
        except PlanError as exc:
            print(f"| {path.name} | 0 | not run: refused ({str(exc).splitlines()[0][:90]}) |||||")
            continue
        if resolved.plan.vmm is not None:
            print(f"| {path.name} | 0 | not run: needs its VMMs' QMP sockets |||||")
            continue
        if any(d.backend.name != "simulated" for d in resolved.devices):
            print(f"| {path.name} | 0 | not run: not only simulated devices |||||")
            continue
        runs_of: list[Trial] = []
        for _ in range(runs):
            report = trio.run(Migration(resolved).run)
            runs_of.append(
                Trial.of(SHIPPED, "one host", SHIPPED_POLICY, report.model_dump(mode="json"))
            )
            progress()
        outcomes = [t.outcome for t in runs_of]
        downtimes = [t.downtime_ms for t in runs_of if t.downtime_ms is not None]
        predicted = [t.predicted_ms for t in runs_of if t.predicted_ms is not None]
        counted = ", ".join(f"{o} {outcomes.count(o)}" for o in sorted(set(outcomes)))
        if not downtimes:
            counted += " (no pause: it ended before the switchover)"
        print(
            f"| {path.name} | {runs} | {counted} | {_ms(quantile(downtimes, 0.5))} "
            f"| {_ms(quantile(downtimes, 0.99))} | {_ms(max(downtimes, default=None))} "
            f"| {_ms(quantile(predicted, 0.5))} "
            f"| {resolved.plan.downtime_limit_ms:g} |"
        )
        paused = sorted((t for t in runs_of if t.downtime_ms is not None), key=_downtime)
        if paused:
            median = paused[len(paused) // 2]
            details.append(f"- {path.name}, its median run: measured {_ms(median.downtime_ms)} ms")
            details.append(f"  predicted {_ms(median.predicted_ms)} ms")
            details += window_lines(median)
    if details:
        print("\n" + "\n".join(details))


def _downtime(t: Trial) -> float:
    return t.downtime_ms or 0.0


# -- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7, help="seed of the matrix")
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="configurations (each runs on every placement under every policy); "
        "default 64, 8 with --quick",
    )
    parser.add_argument("--quick", action="store_true", help="fewer, smaller configurations")
    parser.add_argument(
        "--placements", default="one-host,two-daemons", help="one-host, two-daemons or both"
    )
    parser.add_argument(
        "--plan-runs",
        type=int,
        default=None,
        help="runs of each shipped example plan (0: none); default 20, 5 with --quick",
    )
    parser.add_argument("--worst", type=int, default=5, help="trials listed per missed target")
    args = parser.parse_args(argv)
    trials_n = args.trials if args.trials is not None else (8 if args.quick else 64)
    plan_runs = args.plan_runs if args.plan_runs is not None else (5 if args.quick else 20)
    placements = [PLACEMENTS[p] for p in args.placements.split(",")]
    logs.configure("error")

    started = time.monotonic()
    policy_axis, note = policies()
    configs = draw_matrix(args.seed, trials_n, quick=args.quick)
    total = len(configs) * len(policy_axis) * len(placements)
    print(f"command: {shlex.join([sys.executable, *sys.argv[:1], *(argv or sys.argv[1:])])}")
    print(
        f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cpu, "
        f"Python {platform.python_version()}; seed {args.seed}: {len(configs)} configurations "
        f"x {len(placements)} placement(s) x {len(policy_axis)} policies = {total} migrations"
    )
    if note:
        print(note)
    runners = {"one host": run_one_host, "two daemons": run_two_daemons}
    trials: list[Trial] = []
    for placement in placements:
        trials += runners[placement](configs, policy_axis, progress)
    matrix_s = time.monotonic() - started
    sys.stderr.write("\n")

    rows = summarize(trials, policy_axis)
    print_ratio_table(rows)
    print_count_table(rows)
    print_stuck(trials)
    print_strict_table(rows, note)
    print_misses(rows, args.worst)
    for placement in placements:
        for subset in SUBSETS:
            print_component_errors(trials, placement, subset)
    print(f"\nthe matrix: {total} migrations in {matrix_s:.0f} s")
    if plan_runs:
        shipped_plans(plan_runs)
        sys.stderr.write("\n")
    print(f"\ntotal: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
