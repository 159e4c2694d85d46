"""The destination daemon's thin server: what it refuses while it cannot act."""

from __future__ import annotations

import pytest

from orchestrator.peer import protocol as p
from orchestrator.peer.incoming_models import IncomingNotServing
from orchestrator.peer.messages import encode
from orchestrator.peer.registry import IncomingRegistry
from orchestrator.peer.server import IncomingMigration
from tests.helpers import make_resolved, sim_device


def registry_with_one_being_recovered() -> tuple[IncomingRegistry, IncomingMigration]:
    registry = IncomingRegistry(
        journal=None,
        backends=None,
        listener=None,
        advertise=None,
        lock=lambda keys, owner: None,
        unlock=lambda keys, owner: None,
    )
    resolved = make_resolved([sim_device("gpu0")])
    migration = IncomingMigration(
        resolved, "m1", None, {"api": "http://src", "token": "t" * 32}, release=lambda: None
    )
    # As a restart registers it: known, its devices being opened, not yet served.
    registry.migrations["m1"] = migration
    return registry, migration


async def test_a_message_during_recovery_is_refused_unread() -> None:
    # Seen in the fault campaign: the source's abort reached a migration still
    # being recovered (no task to carry out its steps); the machine took it,
    # its reset never ran, and the migration stayed stuck, its devices locked.
    registry, migration = registry_with_one_being_recovered()
    before = migration.machine.state
    with pytest.raises(IncomingNotServing, match="being recovered") as info:
        await registry.deliver("m1", encode(p.Abort("the source rolled back")))
    assert info.value.status_hint == 503
    assert migration.machine.state is before


async def test_an_operator_settle_during_recovery_is_refused_too() -> None:
    registry, migration = registry_with_one_being_recovered()
    migration.machine, _ = p.DestinationMachine.restarted(voted=True, committed=False, outcome=None)
    with pytest.raises(IncomingNotServing):
        await registry.settle("m1", "abort", force=True)
    assert migration.machine.state is p.DestinationState.IN_DOUBT


async def test_an_ended_migration_whose_record_was_not_journaled_still_answers() -> None:
    # The journal refused its outcome: the migration stays in memory, ended.  The
    # source's repeated commit must get how it ended, not "ask again" forever.
    registry, migration = registry_with_one_being_recovered()
    migration.machine, _ = p.DestinationMachine.restarted(
        voted=True, committed=True, outcome="succeeded"
    )
    migration.done.set()
    answer = await registry.deliver("m1", encode(p.Commit()))
    assert [r["op"] for r in answer.replies] == ["completed"], answer.replies
