"""The destination's share of a strict budget, on its own clock (``engine.allowance``)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from orchestrator.engine import OverBudget, Share
from orchestrator.engine.allowance import Allowance


async def test_ungranted_every_step_may_begin(autojump_clock: Any) -> None:
    allowance = Allowance()
    await trio.sleep(3600)
    allowance.check("settle_arcs", "gpu0")
    allowance.check("vote")
    assert allowance.as_report() is None


async def test_a_step_is_refused_once_it_cannot_end_within_the_share(
    autojump_clock: Any,
) -> None:
    allowance = Allowance()
    allowance.grant(Share(left_s=0.050, settle_s=0.010))
    await trio.sleep(0.040)
    allowance.check("settle_arcs", "gpu0")  # ends at 50 ms: fits
    await trio.sleep(0.001)
    with pytest.raises(OverBudget) as info:
        allowance.check("settle_arcs", "gpu1")
    over = info.value
    assert (over.step, over.device) == ("settle_arcs", "gpu1")
    assert over.elapsed_s == pytest.approx(0.041) and over.over_s == pytest.approx(0.001)
    assert "settle_arcs of gpu1 needs 10.0 ms with 9.0 ms" in str(over)
    # The vote needs nothing more of the destination than to be on its way.
    allowance.check("vote")
    report = allowance.as_report()
    assert report is not None and report["left_ms"] == 50.0
    assert [(c["device"], c["fits"]) for c in report["checks"]] == [
        ("gpu0", True),
        ("gpu1", False),
        (None, True),
    ]


async def test_a_repeated_grant_keeps_the_first_clock(autojump_clock: Any) -> None:
    # The source re-sends a message cut short; the share counts from its first receipt.
    allowance = Allowance()
    allowance.grant(Share(left_s=0.020, settle_s=0.0))
    await trio.sleep(0.030)
    allowance.grant(Share(left_s=0.020, settle_s=0.0))
    with pytest.raises(OverBudget):
        allowance.check("vote")


async def test_a_share_that_came_after_a_stream_ended_is_not_taken(autojump_clock: Any) -> None:
    # Over REST, or behind the data: counted from its late receipt it would be too
    # generous, so the destination leaves the guarding to the source's own checks.
    allowance = Allowance()
    allowance.grant(Share(left_s=0.0, settle_s=0.010), late=True)
    allowance.check("settle_arcs", "gpu0")
    report = allowance.as_report()
    assert report is not None and report["taken"] is False and report["checks"] == []
