"""bench/fault_campaign.py: its checker catches what it is for, and a tiny campaign runs clean.

The checker's tests make real device files (persistent simulated devices,
migrated or not in this process) and show that each invariant it checks
is caught when broken: a checker that saw nothing would pass any campaign.
The campaign test runs three quick trials of two real daemons, each killed
at a chosen moment and restarted, and reads the table it prints.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.backends.simulated import SimulatedBackend, SimulatedDevice, SimulatedParams
from orchestrator.plan import parse_plan
from orchestrator.resolve import ResolvedPlan, resolve
from orchestrator.states import DeviceState, Side
from tests.helpers import load_bench
from tests.test_sim_persistence import drain, migrate, walk

ROOT = Path(__file__).resolve().parent.parent
S = DeviceState


fc = load_bench("fault_campaign")


# -- the checker ----------------------------------------------------------------------------


def _resolved() -> ResolvedPlan:
    device = {"name": "dev0", "backend": "simulated", "source": {"state_mib": 1 / 16, "seed": 3}}
    return resolve(parse_plan({"vm": "vm-check", "downtime_limit_ms": 500, "devices": [device]}))


class Hosts:
    """The state directories of two daemons, with one device of ``_resolved()`` each."""

    def __init__(self, base: Path) -> None:
        self.resolved = _resolved()
        self.dirs = {"source": base / "src", "destination": base / "dst"}

    async def device(self, role: str) -> SimulatedDevice:
        side = Side.SOURCE if role == "source" else Side.DESTINATION
        spec = self.resolved.devices[0]
        params = spec.source if role == "source" else spec.destination
        assert isinstance(params, SimulatedParams)
        dev = SimulatedBackend(self.dirs[role]).create("dev0", side, params)
        assert isinstance(dev, SimulatedDevice)
        await dev.open()
        return dev

    def judge(
        self,
        source: str | None,
        destination: str | None,
        *,
        committed: bool | None = None,
        observed: Any = None,
    ) -> list[str]:
        """The kinds of violation found, with these outcomes in the two journals."""
        left = fc.read_persisted(self.resolved, "m1", self.dirs, {})
        done = committed if committed is not None else source == "succeeded"
        journals = {
            role: None if outcome is None else {"outcome": outcome, "committed": int(done)}
            for role, outcome in (("source", source), ("destination", destination))
        }
        left = dataclasses.replace(left, journals=journals)
        return sorted({v.kind for v in fc.judge(left, observed or fc.Observed())})


async def _switched_over(hosts: Hosts) -> tuple[SimulatedDevice, SimulatedDevice]:
    """Source STOP, destination RUNNING with the source's state: a finished migration."""
    src, dst = await hosts.device("source"), await hosts.device("destination")
    await migrate(src, dst)
    await walk(dst, S.RUNNING_P2P, S.RUNNING)
    await walk(src, S.STOP)
    return src, dst


async def test_a_clean_switchover_and_a_clean_rollback_pass(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path / "a")
    for dev in await _switched_over(hosts):
        await dev.close()
    assert hosts.judge("succeeded", "succeeded") == []

    hosts = Hosts(tmp_path / "b")
    src, dst = await hosts.device("source"), await hosts.device("destination")
    await walk(dst, S.RUNNING_P2P, S.STOP, S.RESUMING)
    await walk(src, S.PRE_COPY)
    await dst.write(await drain(src))
    await walk(src, S.RUNNING)
    await dst.reset()
    for dev in (src, dst):
        await dev.close()
    assert hosts.judge("rolled_back", "rolled_back") == []
    # A source that never opened its device (refused early) left it as it was.
    assert Hosts(tmp_path / "c").judge("refused", None) == []


async def test_both_sides_running_is_caught(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path)
    src, dst = await _switched_over(hosts)
    await walk(src, S.RUNNING_P2P, S.RUNNING)  # the source resumed: a split brain
    for dev in (src, dst):
        await dev.close()
    assert "both_running" in hosts.judge("succeeded", "succeeded")
    assert "both_running" in hosts.judge("rolled_back", "rolled_back", committed=False)


async def test_neither_side_running_and_the_wrong_side_are_caught(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path / "a")
    src, dst = await hosts.device("source"), await hosts.device("destination")
    await migrate(src, dst)  # both stopped, the destination loaded but never run
    for dev in (src, dst):
        await dev.close()
    assert hosts.judge("succeeded", "succeeded") == ["neither_running"]
    assert hosts.judge("rolled_back", "rolled_back", committed=False) == [
        "neither_running",
        "not_reset",
    ]

    hosts = Hosts(tmp_path / "b")
    for dev in await _switched_over(hosts):
        await dev.close()
    assert hosts.judge("rolled_back", "rolled_back", committed=False) == ["wrong_side"]


async def test_journals_that_disagree_or_miss_the_migration_are_caught(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path)
    for dev in await _switched_over(hosts):
        await dev.close()
    assert hosts.judge("succeeded", "rolled_back") == ["journals_disagree"]
    # The destination moved its device for the migration, so it must have journaled it.
    assert hosts.judge("succeeded", None) == ["journal_missing"]
    assert hosts.judge(None, "succeeded") == ["journal_missing"]
    # A destination that never heard of it: nothing is missing.
    assert Hosts(tmp_path / "untouched").judge("refused", None) == []
    knew = fc.Observed(destination_knew=True)
    assert Hosts(tmp_path / "shown").judge("refused", None, observed=knew) == ["journal_missing"]


async def test_a_device_left_locked_is_caught(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path)
    src, dst = await _switched_over(hosts)
    await src.close()
    # Still open: its file is still locked, as by a daemon that never let it go.
    assert "device_locked" in hosts.judge("succeeded", "succeeded")
    await dst.close()
    held = fc.Observed(locks={"destination": ["simulated:dev0 by m1"]})
    assert hosts.judge("succeeded", "succeeded", observed=held) == ["device_locked"]
    left = fc.read_persisted(hosts.resolved, "m1", hosts.dirs, {})
    left = dataclasses.replace(left, unfinished={"source": ["m1"], "destination": []})
    kinds = {v.kind for v in fc.judge(left, fc.Observed())}
    assert kinds == {"device_locked", "journal_missing"}


async def test_vcpus_running_on_both_sides_are_caught(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path)
    for dev in await _switched_over(hosts):
        await dev.close()
    files = {role: tmp_path / f"vcpus-{role}" for role in ("source", "destination")}
    files["source"].write_text("running\n")
    files["destination"].write_text("running\n")
    left = fc.read_persisted(hosts.resolved, "m1", hosts.dirs, files)
    row = {"outcome": "succeeded", "committed": 1}
    left = dataclasses.replace(left, journals={"source": row, "destination": row})
    assert [v.kind for v in fc.judge(left, fc.Observed())] == ["both_running"]
    files["source"].write_text("paused\n")
    left = dataclasses.replace(
        fc.read_persisted(hosts.resolved, "m1", hosts.dirs, files),
        journals={"source": row, "destination": row},
    )
    assert fc.judge(left, fc.Observed()) == []


# -- a tiny campaign ------------------------------------------------------------------------


def _rows(out: str, first_column: str) -> dict[str, list[int]]:
    """The table whose first column is ``first_column``: label -> its numbers."""
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"| {first_column} |")))
    rows: dict[str, list[int]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        label, *cells = (cell.strip() for cell in line.strip("|").split("|"))
        rows[label] = [int(cell) for cell in cells]
    return rows


@pytest.mark.slow
def test_a_quick_campaign_strikes_every_trial_and_finds_no_violation() -> None:
    args = ["--trials", "3", "--seed", "3", "--quick"]
    done = subprocess.run(
        [sys.executable, "bench/fault_campaign.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert out.startswith(f"command: python bench/fault_campaign.py {' '.join(args)}\n")
    assert re.search(r"^# .*; 3 trials in [\d.]+ s \(a trial: median", out, re.M), out
    # Every trial struck its fault and ended with an outcome in the source's journal.
    faults = _rows(out, "fault")
    columns = ["trials", "succeeded", "rolled_back", "refused", "failed", "none", "violations"]
    everything = dict(zip(columns, faults.pop("all"), strict=True))
    assert everything["trials"] == 3 and everything["violations"] == 0, out
    assert everything["none"] == 0
    assert sum(everything[o] for o in ("succeeded", "rolled_back", "refused", "failed")) == 3
    assert all(label.startswith("kill ") for label in faults), faults
    assert sum(cells[0] for cells in faults.values()) == 3
    # The faults struck migrations in flight, not only finished ones.
    phases = _rows(out, "phase hit")
    assert sum(cells[0] for cells in phases.values()) == 3
    assert set(phases) - {"ended", "unknown"}, phases
    violations = _rows(out, "violation")
    assert violations.pop("total") == [0]
    assert set(violations) == set(fc.VIOLATIONS)
    assert all(cells == [0] for cells in violations.values()), violations
    # One progress line a trial, on stderr.
    assert len(re.findall(r"^trial \d+ \(\d/3\): kill ", done.stderr, re.M)) == 3
