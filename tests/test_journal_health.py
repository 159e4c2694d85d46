"""A journal that stops taking writes, then takes them again: the daemon says why it
is not ready meanwhile, forgets nothing, and is ready again after, every status true.

The journal is made to refuse writes as SQLite refuses them on a read-only file
(``PRAGMA query_only`` on its writer connection: SQLITE_READONLY through the
journal's real code path), since these tests run as root, whom file modes do not
stop; then the pragma is turned off again, as the disk being writable again.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import trio

from orchestrator.journal import Journal
from tests.test_api import SLOW, Api, api, plan_body, submit, wait_done, wait_phase

__all__ = ["api"]  # the fixture, used by name


async def writable(journal: Journal, yes: bool) -> None:
    def set_mode(db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA query_only = {'OFF' if yes else 'ON'}")

    await journal._run(set_mode)


async def readyz(api: Api) -> tuple[int, dict[str, Any]]:
    response = await api.client.get("/readyz")
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def test_a_journal_writable_again_leaves_the_daemon_ready_and_the_record_whole(
    api: Api,
) -> None:
    journal = api.service.journal
    status = await submit(api, plan_body("vm1", "gpu0", **SLOW))
    await wait_phase(api, status.id, "precopy")
    await writable(journal, False)
    cancelled = await api.client.post(f"/v1/migrations/{status.id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    ended = await wait_done(api, status.id)

    # The migration rolled back; its report could not be journaled: the API shows
    # it ended (from memory), not running, and the daemon says why it is not ready.
    assert ended.outcome == "rolled_back" and ended.finished_at is not None
    assert (await journal.get(status.id)) is not None
    assert (await journal.get(status.id)).outcome is None  # type: ignore[union-attr]
    listed = (await api.client.get("/v1/migrations")).json()["migrations"]
    assert [(m["id"], m["outcome"]) for m in listed] == [(status.id, "rolled_back")]
    code, body = await readyz(api)
    assert code == 503 and "journal refuses writes" in body["error"]["message"]
    assert "readonly" in body["error"]["message"]
    refused = await api.client.post("/v1/migrations", json=plan_body("vm2", "gpu1"))
    assert refused.status_code == 503 and "journal" in refused.json()["error"]["message"]
    # Its devices are free all the same.
    assert all(d["migration"] is None for d in (await api.client.get("/v1/devices")).json())

    await writable(journal, True)
    with trio.fail_after(20):
        while (await readyz(api))[0] != 200:
            await api.service.journal_tried.wait()
    assert (await readyz(api))[1] == {
        "ready": True,
        "recovered": True,
        "accepting": True,
        "journal_writable": True,
    }
    # What was refused went in, in order: the report and every event before it.
    record = await journal.get(status.id)
    assert record is not None and record.outcome == "rolled_back"
    events = await journal.events(status.id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind == "finished"
    assert any(e.kind == "phase" and e.detail.get("phase") == "rollback" for e in events)
    # And the daemon works as before.
    again = await submit(api, plan_body("vm2", "gpu1"))
    assert (await wait_done(api, again.id)).outcome == "succeeded"
