"""bench/sleep_lateness.py runs: a smoke run in quick mode (nothing timed is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.backends import precise_sleep

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    precise_sleep._TIMERFD is None, reason="no timerfd in this C library: nothing to compare"
)
def test_sleep_lateness_quick_run_prints_its_table() -> None:
    out = subprocess.run(
        [sys.executable, "bench/sleep_lateness.py", "--quick", "--wakeups-us", "0,300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.startswith("command: python bench/sleep_lateness.py --quick --wakeups-us 0,300\n")
    numbers = r" \| ([\d.]+)" * 5
    row = rf"^\| 1000 \| (-|300){numbers} \| (-|met|missed) \|$"
    rows = re.findall(row, out, re.M)
    assert [r[0] for r in rows] == ["-", "300"]
    for period, ours, ours_p90, theirs, theirs_p90, ratio, verdict in rows:
        # Lateness is never negative: neither sleep ends before its deadline.
        assert float(ours_p90) >= float(ours) >= 0 and float(theirs_p90) >= float(theirs) > 0
        # Each figure is rounded on its own: allow for that.
        rounding = 0.005 + 0.05 * (1 / float(theirs)) * (1 + float(ratio))
        assert abs(float(ratio) - float(ours) / float(theirs)) <= rounding
        if period == "-":
            assert verdict == "-"  # no wake-ups: shown, not a target
        elif float(ratio) != 0.50:
            assert verdict == ("met" if float(ratio) < 0.50 else "missed")
