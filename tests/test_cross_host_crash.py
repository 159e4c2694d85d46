"""Either daemon of a migration between two hosts killed (SIGKILL) in its course.

Two ``orchestrator serve`` processes on loopback (``tests.two_daemons``), each
with its own state directory: simulated devices persist there, as hardware
outlives the process driving it.  After any single crash, once both daemons
run again, both journals hold the same outcome, the VM runs on exactly one
host and no device stays locked, with no operator's help:

* the destination killed while preparing: the source refuses, every device as
  it was; the restarted destination rolls back and learns the outcome;
* the destination killed during pre-copy: the source rolls back at once; the
  restarted destination, which never voted, resets and learns the outcome;
* the destination killed after its vote, during the stop-copy: the restarted
  destination is in doubt and asks the source, which aborted: it resets;
* the destination killed after the commit: the source, in doubt, delivers the
  commit again until the restarted destination completes, then journals
  succeeded (never failed first);
* the source killed after the commit: the destination completes; the
  restarted source finds the commit in its journal and stops its devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.two_daemons import Host, cross_plan, ended, two_daemons, until

pytestmark = pytest.mark.slow


def _plan(destination: Host, token_file: Path, devices: list[dict[str, Any]], **extra: Any) -> Any:
    plan = cross_plan(destination, token_file)
    # Crashes, not the limit, are the point: a limit the slow arcs' window fits.
    plan.update(vm="vm-crash", devices=devices, downtime_limit_ms=60_000)
    plan.update(extra)
    return plan


def _device(name: str, seed: int, source: dict[str, Any], **destination: Any) -> dict[str, Any]:
    device: dict[str, Any] = {"name": name, "backend": "simulated", "source": {"seed": seed}}
    device["source"].update(source)
    if destination:
        device["destination"] = destination
    return device


def _slow_after_the_commit() -> list[dict[str, Any]]:
    """Two devices whose slow destination arcs (2 s each) hold the window after the
    commit open: long beside a status poll and a kill, even on a loaded machine."""
    return [
        _device(f"nic{i}", i, {"state_mib": 0.25, "transition_ms": 1}, transition_ms=2000)
        for i in range(2)
    ]


async def _migrate_until_the_vote_is_journaled(a: Host, b: Host, token_file: Path) -> str:
    """A migration in its stop-copy whose destination journaled its vote already."""
    devices = [
        # Small: its stream ends first, and the vote is journaled then.
        _device("nic0", 0, {"state_mib": 0.0625}),
        # Large and without pre-copy: all of it moves in the stop-copy.
        _device("gpu0", 1, {"state_mib": 16, "pre_copy": False}),
    ]
    plan = _plan(b, token_file, devices, bandwidth_limit_mib_s=4, downtime_limit_ms=60000)
    migration_id = await a.submit(plan)
    await until(
        lambda: b.incoming(migration_id),
        lambda s: (s.get("devices") or {}).get("nic0", {}).get("ready") is True,
    )
    return migration_id


def _sent(status: dict[str, Any]) -> int:
    return sum((status.get("progress") or {}).get("bytes_sent", {}).values())


async def _free_devices(host: Host) -> None:
    """No device of this host is held by a migration."""
    code, devices = await host.get("/v1/devices")
    assert code == 200
    held = [d for d in devices if d["migration"] is not None]
    assert not held, held


async def _agree(a: Host, b: Host, migration_id: str, outcome: str) -> None:
    """Both journals end with ``outcome``; nothing is held on either host."""
    source = await until(lambda: a.status(migration_id), ended, seconds=60)
    far = await until(lambda: b.incoming(migration_id), ended, seconds=60)
    assert source["outcome"] == outcome, source.get("report")
    assert far["outcome"] == outcome, far
    assert [row[1] for row in a.journal_rows(migration_id)] == [outcome]
    assert [row[1] for row in b.journal_rows(migration_id)] == [outcome]
    await _free_devices(a)
    await _free_devices(b)


async def test_destination_killed_while_preparing_refuses_and_both_agree(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file, processes=True) as (a, b):
        # Slow destination arcs: the walk to RESUMING (before pre-copy) takes seconds.
        devices = [_device("gpu0", 0, {"state_mib": 0.25}, transition_ms=1500)]
        migration_id = await a.submit(_plan(b, token_file, devices))
        await until(lambda: b.incoming(migration_id), lambda s: s.get("phase") == "transfer")
        b.kill()
        await b.wait_killed()
        status = await until(lambda: a.status(migration_id), ended)
        report = status["report"]
        assert status["outcome"] == "refused", report
        assert [d["source_state"] for d in report["devices"]] == ["RUNNING"]
        await b.start()
        await _agree(a, b, migration_id, "refused")
        far = await b.incoming(migration_id)
        assert far["devices"]["gpu0"]["state"] == "RUNNING"


async def test_destination_killed_mid_way_source_rolls_back_destination_resets_on_restart(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file, processes=True) as (a, b):
        devices = [_device(f"gpu{i}", i, {"state_mib": 8}) for i in range(2)]
        plan = _plan(b, token_file, devices, bandwidth_limit_mib_s=4, timeouts={"device_call_s": 6})
        migration_id = await a.submit(plan)
        await until(lambda: a.status(migration_id), lambda s: _sent(s) > 1 << 20)
        b.kill()
        await b.wait_killed()
        status = await until(lambda: a.status(migration_id), ended)
        report = status["report"]
        assert status["outcome"] == "rolled_back", report
        assert report["committed"] is False
        assert report["error"]["kind"] in ("peer_error", "device_error"), report["error"]
        assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
        assert any("reset not confirmed" in note for note in report["notes"]), report["notes"]
        # The destination, restarted, rolls back what it had prepared and asks how
        # it ended.
        await b.start()
        await _agree(a, b, migration_id, "rolled_back")
        far = await b.incoming(migration_id)
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}


async def test_destination_killed_after_its_vote_asks_the_source_and_resets(
    short_dir: Path, token_file: Path
) -> None:
    # The bug of old: the restarted destination waited for a decision forever,
    # its devices locked, until someone posted an abort by hand.
    async with two_daemons(short_dir, token_file, processes=True) as (a, b):
        migration_id = await _migrate_until_the_vote_is_journaled(a, b, token_file)
        b.kill()
        await b.wait_killed()
        status = await until(lambda: a.status(migration_id), ended)
        assert status["outcome"] == "rolled_back", status["report"]
        await b.start()
        await _agree(a, b, migration_id, "rolled_back")


async def test_destination_killed_after_the_commit_source_learns_it_succeeded(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file, processes=True) as (a, b):
        migration_id = await a.submit(_plan(b, token_file, _slow_after_the_commit()))
        await until(lambda: a.status(migration_id), lambda s: s.get("committed") is True, 60)
        b.kill()
        await b.wait_killed()
        # The source waits on the destination's word: no outcome yet, in doubt.
        doubt = await until(lambda: a.status(migration_id), lambda s: s.get("in_doubt") is True)
        assert doubt["outcome"] is None
        await b.start()
        await _agree(a, b, migration_id, "succeeded")
        far = await b.incoming(migration_id)
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}
        report = (await a.status(migration_id))["report"]
        assert {d["source_state"] for d in report["devices"]} == {"STOP"}


async def test_source_killed_after_the_commit_destination_completes_source_stops_on_restart(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file, processes=True) as (a, b):
        migration_id = await a.submit(_plan(b, token_file, _slow_after_the_commit()))
        await until(
            lambda: b.incoming(migration_id), lambda s: s.get("committed") is True, seconds=60
        )
        a.kill()
        await a.wait_killed()
        far = await until(lambda: b.incoming(migration_id), ended)
        assert far["outcome"] == "succeeded", far
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}

        # The source, restarted, finds the commit and stops its devices for good.
        await a.start()
        await _agree(a, b, migration_id, "succeeded")
        report = (await a.status(migration_id))["report"]
        assert report["committed"] is True
        assert {d["source_state"] for d in report["devices"]} == {"STOP"}
        assert any("completed on restart" in note for note in report["notes"]), report["notes"]


async def test_source_killed_in_pre_copy_both_roll_back_after_its_restart(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file, processes=True) as (a, b):
        devices = [_device(f"gpu{i}", i, {"state_mib": 8}) for i in range(2)]
        plan = _plan(b, token_file, devices, bandwidth_limit_mib_s=4)
        migration_id = await a.submit(plan)
        await until(lambda: a.status(migration_id), lambda s: _sent(s) > 1 << 20)
        a.kill()
        await a.wait_killed()
        # The destination, which never voted, resets alone and frees its devices.
        await until(lambda: b.incoming(migration_id), lambda s: s.get("phase") == "aborted")
        await _free_devices(b)
        await a.start()
        await _agree(a, b, migration_id, "rolled_back")
        report = (await a.status(migration_id))["report"]
        assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}


async def test_source_killed_after_the_vote_destination_asks_and_both_roll_back(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file, processes=True) as (a, b):
        migration_id = await _migrate_until_the_vote_is_journaled(a, b, token_file)
        a.kill()
        await a.wait_killed()
        await a.start()
        await _agree(a, b, migration_id, "rolled_back")


async def test_a_source_in_doubt_shuts_down_at_once_and_its_restart_finishes(
    short_dir: Path, token_file: Path
) -> None:
    # Of old, SIGTERM hung: the committed migration waited for its destination forever.
    async with two_daemons(short_dir, token_file, processes=True) as (a, b):
        migration_id = await a.submit(_plan(b, token_file, _slow_after_the_commit()))
        await until(lambda: a.status(migration_id), lambda s: s.get("committed") is True, 60)
        b.kill()
        await b.wait_killed()
        await until(lambda: a.status(migration_id), lambda s: s.get("in_doubt") is True)
        await a.stop()  # fails the test if SIGTERM does not end it within 15 s
        # Nothing journaled as its end: the commit alone, for the restart to finish.
        assert a.journal_rows(migration_id) == [("source", None, 1)]
        await b.start()
        await a.start()
        await _agree(a, b, migration_id, "succeeded")
