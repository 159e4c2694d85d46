"""The invariants library itself: an outcome's check passes a migration that kept
that outcome's promise, and fails one whose report claims it falsely.

Today's runner does not end a migration ``refused`` yet; these tests give a
migration that ended in prepare, and one that had begun pre-copy, the report a
refusal would have, and hold ``check_outcome`` to the devices as they are.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio.testing

from orchestrator.engine import Migration
from tests.helpers import make_resolved, sim_device
from tests.invariants import check_all, check_outcome


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def migrate(**gpu1: dict[str, Any]) -> Migration:
    """Two simulated GPUs, gpu1's source and destination parameters given."""
    m = Migration(
        make_resolved(
            [sim_device("gpu0", transition_ms=1), sim_device("gpu1", transition_ms=1, **gpu1)]
        )
    )
    await m.run()
    assert m.report is not None
    return m


def claim_refused(m: Migration) -> None:
    """Rewrite the report as a refusal: outcome, no downtime, no pre-copy timed."""
    assert m.report is not None
    phases = {k: v for k, v in m.report.phases.items() if k == "prepare"}
    m.report = m.report.model_copy(
        update={"outcome": "refused", "downtime_ms": None, "phases": phases}
    )


async def test_a_migration_that_ended_in_prepare_passes_as_refused(autojump_clock: Any) -> None:
    # gpu1's destination fails as prepare walks it to RESUMING: no source device moved.
    m = await migrate(destination={"fault": {"at": "RESUMING", "kind": "error"}})
    assert m.report is not None and m.report.error is not None
    assert m.report.error.phase == "prepare"
    claim_refused(m)
    await check_all(m)


async def test_a_migration_that_began_pre_copy_fails_as_refused(autojump_clock: Any) -> None:
    # gpu1's source fails as it stops: pre-copy had run, the source devices moved.
    m = await migrate(fault={"at": "STOP_COPY", "kind": "error"})
    assert m.report is not None and m.report.outcome == "rolled_back"
    await check_all(m)
    claim_refused(m)
    with pytest.raises(AssertionError, match="gpu0"):
        await check_outcome(m)
