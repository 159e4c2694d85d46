"""A process driving persistent simulated devices until it is killed: the recovery tests' victim.

python -m tests.sim_child migrate STATE_DIR   run MIGRATION_PLAN's migration; print
                                              "phase <name>" as each phase starts (the
                                              first arc of prepare counts as its start),
                                              "committed" once the decision is recorded,
                                              "finished <outcome>" at the end, then wait
python -m tests.sim_child hold STATE_DIR      open gpu0's source, print "held", wait
python -m tests.sim_child dirty STATE_DIR     open DIRTY_DEVICE running, print "dirtying",
                                              then make it dirty itself without pause
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from orchestrator.backends import backends_for
from orchestrator.backends.simulated import SimulatedBackend, SimulatedDevice, SimulatedParams
from orchestrator.engine import Migration, TraceEvent
from orchestrator.plan import Plan
from orchestrator.resolve import resolve
from orchestrator.states import Side
from tests.helpers import make_plan, sim_device

#: Slow enough that every phase lasts long enough to be killed in, with a margin.
SLOW = {"transition_ms": 80, "drain_mib_s": 1.0}
#: How long the commit decision takes to record: the commit phase before it is recorded.
COMMIT_RECORD_S = 0.3


def migration_plan() -> Plan:
    """Two devices in the P2P barrier: one with pre-copy (dirtying), one without;
    and one without P2P, which joins them by order (stops last, runs first)."""
    return make_plan(
        [
            sim_device(
                "gpu0",
                state_mib=0.25,
                seed=11,
                dirty_mib_s=0.05,
                **SLOW,
                destination={**SLOW, "drain_mib_s": 2.0},
            ),
            sim_device("nic0", state_mib=0.125, seed=12, pre_copy=False, **SLOW, destination=SLOW),
            sim_device("vf0", state_mib=0.0625, seed=13, p2p=False, **SLOW, destination=SLOW),
        ],
        vm="vm-crash",
        # Slow arcs and a slow commit record: a limit the predicted window fits,
        # so that the migration reaches every phase a kill is aimed at.
        downtime_limit_ms=10_000,
    )


#: Dirties as fast as the process can: its batches outgrow the time they take, so
#: the process spends its life inside one, and a kill lands in the middle of one.
DIRTY_DEVICE = ("dirty0", SimulatedParams(state_mib=1 / 16, dirty_mib_s=65536.0, seed=5))


class SlowJournal:
    """Takes its time recording the commit decision, as a disk would."""

    async def record_commit(self, migration_id: str) -> None:
        await trio.sleep(COMMIT_RECORD_S)


def say(line: str) -> None:
    print(line, flush=True)


async def migrate(state_dir: Path) -> None:
    resolved = resolve(migration_plan(), backends_for(state_dir))
    started = False

    def watch(event: TraceEvent) -> None:
        nonlocal started
        if event.kind == "arc_begin" and not started:
            started = True
            say("phase prepare")
        elif event.kind == "phase":
            say(f"phase {event.detail['phase']}")
        elif event.kind == "commit":
            say("committed")

    migration = Migration(resolved, journal=SlowJournal(), observers=[watch])
    report = await migration.run()
    say(f"finished {report.outcome}")
    await trio.sleep_forever()


async def hold(state_dir: Path) -> None:
    spec = resolve(migration_plan(), backends_for(state_dir)).devices[0]
    device = spec.backend.create(spec.name, Side.SOURCE, spec.source)
    await device.open()
    say("held")
    await trio.sleep_forever()


async def dirty(state_dir: Path) -> None:
    name, params = DIRTY_DEVICE
    device = SimulatedBackend(state_dir).create(name, Side.SOURCE, params)
    assert isinstance(device, SimulatedDevice)
    await device.open()
    say(f"dirtying {device.mutations}")
    while True:
        await device.get_state()  # each call catches up with the clock: one batch


if __name__ == "__main__":
    modes = {"migrate": migrate, "hold": hold, "dirty": dirty}
    trio.run(modes[sys.argv[1]], Path(sys.argv[2]))
