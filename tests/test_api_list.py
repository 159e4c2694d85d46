"""GET /v1/migrations for many migrations: pages, filters, summaries, refusals.

Most migrations here are written straight into the service's journal, as the
service records them (created, then finished with a report), so that a list of
hundreds costs no migration run; one runs for real to show a live entry.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from orchestrator.journal import Journal
from orchestrator.plan import parse_plan
from orchestrator.report import ErrorInfo, MigrationReport, Outcome
from orchestrator.status import MAX_PAGE_SIZE, MigrationStatus, MigrationSummary
from tests.test_api import SLOW, Api, api, assert_error, plan_body, problems, submit, wait_done

__all__ = ["api"]  # the fixture, used by name


async def record(
    journal: Journal,
    migration_id: str,
    vm: str,
    outcome: Outcome | None = "succeeded",
    devices: int = 1,
) -> None:
    """A migration as the service journals one: created, then (unless None) ended."""
    names = [f"{migration_id}-d{i}" for i in range(devices)]
    await journal.create(migration_id, parse_plan(plan_body(vm, *names)))
    if outcome is None:
        return
    await journal.record_phase(migration_id, "precopy")
    committed = outcome in ("succeeded", "failed")
    if committed:
        await journal.record_commit(migration_id)
    error = None
    if outcome != "succeeded":
        error = ErrorInfo(kind="device_error", message=f"{migration_id} broke", phase="precopy")
    await journal.finish(
        migration_id,
        MigrationReport(
            id=migration_id,
            vm=vm,
            outcome=outcome,
            duration_ms=10.0,
            downtime_ms=4.5 if committed else None,
            committed=committed,
            error=error,
        ),
    )


async def listing(api: Api, **params: Any) -> dict[str, Any]:
    response = await api.client.get("/v1/migrations", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"migrations", "next_cursor"}
    return body


async def every_page(api: Api, **params: Any) -> list[list[str]]:
    """The ids of each page, following next_cursor to the end."""
    pages: list[list[str]] = []
    cursor = None
    while True:
        body = await listing(api, **params, **({"cursor": cursor} if cursor else {}))
        pages.append([m["id"] for m in body["migrations"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "the cursor never ends"


async def test_pages_follow_the_cursor_newest_first_without_gaps_or_repeats(api: Api) -> None:
    journal = api.service.journal
    ids = [f"m{i:03}" for i in range(25)]
    for mid in ids:
        await record(journal, mid, "vm1")
    newest_first = ids[::-1]

    pages = await every_page(api, limit=10)
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [mid for page in pages for mid in page] == newest_first
    # Exactly a page's worth: the last page says so, no empty page after it.
    assert [len(p) for p in await every_page(api, limit=25)] == [25]
    # A migration created between two pages shows on the first, never shifts the rest.
    first = await listing(api, limit=10)
    await record(journal, "late", "vm1")
    second = await listing(api, limit=10, cursor=first["next_cursor"])
    assert [m["id"] for m in second["migrations"]] == newest_first[10:20]
    # The default page and its bound, stated rather than applied silently.
    assert len((await listing(api))["migrations"]) == 26


async def test_more_than_a_thousand_migrations_are_all_listed(api: Api) -> None:
    """No silent cap: every migration is reachable, a page at most MAX_PAGE_SIZE."""
    journal = api.service.journal
    total = MAX_PAGE_SIZE + 5
    for i in range(total):
        await journal.create(f"m{i:04}", parse_plan(plan_body("vm1", f"d{i}")))
    pages = await every_page(api, limit=MAX_PAGE_SIZE)
    assert [len(p) for p in pages] == [MAX_PAGE_SIZE, 5]
    assert len({mid for page in pages for mid in page}) == total


async def test_filters_by_vm_outcome_phase_and_since_combine_with_paging(api: Api) -> None:
    journal = api.service.journal
    for i in range(6):
        await record(journal, f"a{i}", "vm-a", "succeeded" if i % 2 else "rolled_back")
    between = datetime.now(UTC)
    for i in range(4):
        await record(journal, f"b{i}", "vm-b", "failed")
    await record(journal, "b-running", "vm-b", None)

    async def ids(**params: Any) -> list[str]:
        return [mid for page in await every_page(api, **params) for mid in page]

    assert await ids(vm="vm-a", limit=2) == ["a5", "a4", "a3", "a2", "a1", "a0"]
    assert await ids(vm="vm-a", outcome="succeeded", limit=2) == ["a5", "a3", "a1"]
    assert await ids(vm="vm-b", phase="prepare") == ["b-running"]
    assert await ids(since=between.isoformat(), limit=3) == ["b-running", "b3", "b2", "b1", "b0"]
    assert await ids(since=between.isoformat(), outcome="failed") == ["b3", "b2", "b1", "b0"]
    assert await ids(vm="vm-c") == []
    far = datetime(2999, 1, 1, tzinfo=UTC).isoformat()
    assert await ids(since=far) == []


async def test_entries_are_summaries_and_view_full_gives_each_status(api: Api) -> None:
    journal = api.service.journal
    await record(journal, "big", "vm1", "succeeded", devices=64)
    await record(journal, "broken", "vm2", "failed", devices=2)
    running = await submit(api, plan_body("vm3", "gpu0", **SLOW))

    body = await listing(api)
    by_id = {m["id"]: MigrationSummary.model_validate(m) for m in body["migrations"]}
    assert list(by_id) == [running.id, "broken", "big"]
    big = by_id["big"]
    assert (big.vm, big.outcome, big.devices, big.downtime_ms, big.error) == (
        "vm1",
        "succeeded",
        64,
        4.5,
        None,
    )
    assert big.finished_at is not None and big.started_at <= big.finished_at
    assert by_id["broken"].error == "device_error: broken broke"
    live = by_id[running.id]
    assert (live.outcome, live.finished_at, live.devices) == (None, None, 1)
    # A summary is small whatever the report; the full view carries every report.
    summary = next(m for m in body["migrations"] if m["id"] == "big")
    assert "report" not in summary and len(str(summary)) < 500

    full = await listing(api, view="full")
    statuses = [MigrationStatus.model_validate(m) for m in full["migrations"]]
    assert [s.id for s in statuses] == [running.id, "broken", "big"]
    big_status = statuses[2]
    assert big_status.report is not None and len(big_status.report.devices) == 0
    single = MigrationStatus.model_validate((await api.client.get("/v1/migrations/big")).json())
    assert single == big_status
    assert single.started_at == single.created_at and single.finished_at is not None
    await wait_done(api, running.id)
    ended = MigrationStatus.model_validate(
        (await api.client.get(f"/v1/migrations/{running.id}")).json()
    )
    assert ended.finished_at is not None and ended.finished_at >= ended.started_at


@pytest.mark.parametrize(
    ("params", "paths"),
    [
        ({"limit": "0"}, ["query.limit"]),
        ({"limit": str(MAX_PAGE_SIZE + 1)}, ["query.limit"]),
        ({"limit": "ten"}, ["query.limit"]),
        ({"cursor": "not-a-cursor"}, ["query.cursor"]),
        ({"since": "yesterday"}, ["query.since"]),
        ({"since": "2026-12-08T01:00:00"}, ["query.since"]),  # no offset: ambiguous
        ({"view": "everything"}, ["query.view"]),
        ({"vm": ""}, ["query.vm"]),
        ({"vmm": "vm1"}, ["query.vmm"]),
        ({"limit": "1", "vm": "vm1", "color": "red", "sort": "old"}, ["query.color", "query.sort"]),
    ],
)
async def test_a_bad_or_unknown_parameter_is_422_naming_it(
    api: Api, params: dict[str, str], paths: list[str]
) -> None:
    await record(api.service.journal, "m1", "vm1")
    error = assert_error(
        await api.client.get("/v1/migrations", params=params), 422, "invalid_request"
    )
    assert sorted(p for p, _ in problems(error)) == paths
    assert "Value error" not in error["message"]
    if paths[0] in ("query.vmm", "query.color"):
        assert "unknown parameter" in error["message"] and "limit" in error["message"]


async def test_unknown_parameters_are_refused_on_every_route(api: Api) -> None:
    await record(api.service.journal, "m1", "vm1")
    for path in ("/v1/migrations/m1", "/v1/devices", "/readyz", "/v1/migrations/m1/events"):
        error = assert_error(await api.client.get(path, params={"verbose": "1"}), 422)
        assert [p for p, _ in problems(error)] == ["query.verbose"]
