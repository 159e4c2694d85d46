"""Downtime against device count: the parallel switchover against its ideal.

Migrates N simulated devices whose stop-copy drain takes about 20 ms each
and prints, for each N, the measured downtime, the ideal (the slowest single
device's own stop-copy path: its stop transitions, its drain, and its
destination's load and transitions, with no waiting on anyone), their ratio,
and the same ratio for a sequential baseline that stops and drains the
devices one after another, as QEMU did before 10.0.

The ideal is measured in the same run, from each device's own call times
(so machine noise moves both sides of the ratio together).  Those calls
include the time a device waited for the CPU: every device is driven from
one trio thread.  The table therefore also shows the downtime against one
device migrated alone, which counts that CPU time as overhead too.

    python bench/downtime_scaling.py [--sizes 1,8,64,256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from typing import Any

import trio

from orchestrator import logs
from orchestrator.engine import Migration
from orchestrator.plan import parse_plan
from orchestrator.report import MigrationReport
from orchestrator.resolve import ResolvedPlan, resolve

STATE_KIB = 64


def build_plan(n: int, drain_ms: float, transition_ms: float) -> ResolvedPlan:
    # All of the state moves in stop-copy (no pre-copy), so the drain time
    # is exactly the state divided by the drain rate.
    drain_mib_s = (STATE_KIB / 1024) / (drain_ms / 1000)
    devices: list[dict[str, Any]] = [
        {
            "name": f"dev{i}",
            "backend": "simulated",
            "source": {
                "state_mib": STATE_KIB / 1024,
                "pre_copy": False,
                "drain_mib_s": drain_mib_s,
                "transition_ms": transition_ms,
                "seed": i,
            },
            "destination": {"transition_ms": transition_ms},
        }
        for i in range(n)
    ]
    plan = parse_plan(
        {
            "vm": f"bench-{n}",
            "downtime_limit_ms": 60_000,
            "timeouts": {"device_call_s": 60, "switchover_s": 600},
            "devices": devices,
        }
    )
    return resolve(plan)


def migrate(resolved: ResolvedPlan, sequential: bool) -> MigrationReport:
    migration = Migration(resolved, sequential_switchover=sequential)
    report = trio.run(migration.run)
    if report.outcome != "succeeded" or report.downtime_ms is None:
        raise SystemExit(f"benchmark migration did not succeed: {report.error}")
    return report


def ideal_ms(report: MigrationReport) -> float:
    return max(d.stop_copy_path_ms or 0.0 for d in report.devices)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,8,64,256", help="device counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; the median is shown")
    parser.add_argument("--drain-ms", type=float, default=20.0, help="stop-copy drain per device")
    parser.add_argument(
        "--transition-ms", type=float, default=1.0, help="latency of each state arc"
    )
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential baseline")
    args = parser.parse_args(argv)
    logs.configure("error")
    sizes = [int(x) for x in args.sizes.split(",")]

    print(f"command: python bench/downtime_scaling.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpu, Python {platform.python_version()}, "
        f"{STATE_KIB} KiB per device, drain {args.drain_ms:g} ms, arcs {args.transition_ms:g} ms, "
        f"the run with the median ratio of {args.repeats}"
    )
    alone = build_plan(1, args.drain_ms, args.transition_ms)
    alone_ms = statistics.median(ideal_ms(migrate(alone, sequential=False)) for _ in range(5))
    print(f"one device migrated alone: its stop-copy path takes {alone_ms:.1f} ms (median of 5)")
    header = (
        "| N | downtime ms | ideal ms | ratio | ratio to one device alone "
        "| sequential downtime ms | sequential ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    )
    print("\n".join(header))
    for n in sizes:
        resolved = build_plan(n, args.drain_ms, args.transition_ms)
        runs = [migrate(resolved, sequential=False) for _ in range(args.repeats)]
        # One run's numbers per row, so the row adds up: the run whose ratio
        # is the median one.
        runs.sort(key=lambda r: (r.downtime_ms or 0.0) / ideal_ms(r))
        median_run = runs[len(runs) // 2]
        downtime = median_run.downtime_ms or 0.0
        ideal = ideal_ms(median_run)
        ratio = downtime / ideal
        seq_cells = "| - | - |"
        if not args.no_sequential:
            seq = migrate(resolved, sequential=True)
            seq_down = seq.downtime_ms or 0.0
            seq_cells = f"| {seq_down:.1f} | {seq_down / ideal_ms(seq):.2f} |"
        print(
            f"| {n} | {downtime:.1f} | {ideal:.1f} | {ratio:.3f} | {downtime / alone_ms:.2f} "
            f"{seq_cells}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
