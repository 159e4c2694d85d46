"""The REST API in process: httpx over ASGI, a real service over a real journal.

Migrations run on simulated devices in real time (the HTTP stack has its own
clock), so the devices are small and quick: a whole migration takes tens of
milliseconds, a "slow" one a few hundred.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from orchestrator.api import (
    METRICS_CONTENT_TYPE,
    OPENAPI_PATH,
    MigrationEvent,
    create_app,
    openapi_document,
    render_openapi,
)
from orchestrator.api import app as app_module
from orchestrator.api.app import OrchestratorAPI
from orchestrator.api.client import parse_sse
from orchestrator.control import Control, ControlRefused, ControlRequest, with_limits
from orchestrator.errors import PlanError
from orchestrator.journal import Journal
from orchestrator.metrics import Metrics
from orchestrator.plan import parse_plan, read_plan_data
from orchestrator.report import ErrorInfo, MigrationReport, Outcome
from orchestrator.resolve import load_plan
from orchestrator.service import MigrationService, MigrationStatus
from tests.helpers import sim_device

TOKEN = "token-for-tests-0123456789"
OTHER_TOKEN = "a-second-valid-token"
READ_TOKEN = "a-read-only-token-for-dashboards"
PEER_TOKEN = "a-token-another-hosts-daemon-presents"
MAX_BODY = 64 * 1024
ROOT = Path(__file__).resolve().parent.parent

#: Every route that needs a token: (method, path).
PROTECTED = [
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/migrations"),
    ("GET", "/v1/migrations"),
    ("GET", "/v1/migrations/some-id"),
    ("POST", "/v1/migrations/some-id/cancel"),
    ("PATCH", "/v1/migrations/some-id"),
    ("POST", "/v1/migrations/some-id/switchover"),
    ("GET", "/v1/migrations/some-id/events"),
    ("GET", "/v1/devices"),
]
#: The routes another host's daemon calls (and nothing else a peer token opens).
PEER_ROUTES = [("POST", "/v1/incoming"), ("POST", "/v1/incoming/some-id/messages")]


@dataclass
class Api:
    client: httpx.AsyncClient
    service: MigrationService
    app: OrchestratorAPI

    def anonymous(self, **headers: str) -> httpx.AsyncClient:
        """A client of the same app without the test token (with ``headers`` instead)."""
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://test", headers=headers
        )


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with await Journal.open(tmp_path / "state") as journal:
        registry = CollectorRegistry()
        service = MigrationService(journal, Metrics(registry))
        app = create_app(
            service,
            registry=registry,
            tokens=[TOKEN, OTHER_TOKEN],
            read_tokens=[READ_TOKEN],
            peer_tokens=[PEER_TOKEN],
            max_body_bytes=MAX_BODY,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            async with (
                app.router.lifespan_context(app),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app),
                    base_url="http://test",
                    headers={"authorization": f"Bearer {TOKEN}"},
                ) as client,
            ):
                yield Api(client, service, app)
            await service.shutdown(grace_s=5)
            nursery.cancel_scope.cancel()


def plan_body(vm: str, *names: str, **source: Any) -> dict[str, Any]:
    """A plan as JSON data: quick simulated devices, source parameters overridable."""
    params = {"transition_ms": 1, **source}
    return {
        "vm": vm,
        "downtime_limit_ms": 500,
        "devices": [sim_device(name, **params) for name in names],
    }


#: A migration that takes a few hundred ms: time to be busy, to be cancelled.
SLOW = {"state_mib": 1, "drain_mib_s": 4}


async def submit(api: Api, body: dict[str, Any], **headers: str) -> MigrationStatus:
    response = await api.client.post("/v1/migrations", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return MigrationStatus.model_validate(response.json())


async def wait_outcome(api: Api, migration_id: str, timeout_s: float = 20) -> MigrationStatus:
    """Poll GET /v1/migrations/{id} until the migration has an outcome."""
    with trio.fail_after(timeout_s):
        while True:
            response = await api.client.get(f"/v1/migrations/{migration_id}")
            assert response.status_code == 200, response.text
            status = MigrationStatus.model_validate(response.json())
            if status.outcome is not None:
                return status
            await trio.sleep(0.01)


def assert_error(response: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    """The answer is the API's error body with this status (and kind); returns the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"kind", "message", "problems"}
    assert error["message"] and "Traceback" not in response.text
    if kind is not None:
        assert error["kind"] == kind, error
    return error


def problems(error: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["path"], p["message"]) for p in error["problems"]]


# -- migrations end to end ---------------------------------------------------------------


async def test_submit_then_poll_to_a_successful_report(api: Api) -> None:
    response = await api.client.post("/v1/migrations", json=plan_body("vm1", "gpu0", "gpu1"))
    assert response.status_code == 201
    status = MigrationStatus.model_validate(response.json())
    assert response.headers["location"] == f"/v1/migrations/{status.id}"
    assert status.vm == "vm1" and status.outcome is None and status.progress is not None

    final = await wait_outcome(api, status.id)
    assert final.outcome == "succeeded" and final.committed and final.phase == "done"
    assert final.report is not None and final.progress is None
    assert [d.name for d in final.report.devices] == ["gpu0", "gpu1"]
    assert all(
        d.source_digest is not None and d.source_digest == d.destination_digest
        for d in final.report.devices
    )
    listed = (await api.client.get("/v1/migrations")).json()
    assert [m["id"] for m in listed] == [status.id]


async def test_the_event_stream_follows_the_migration_to_its_end(api: Api) -> None:
    status = await submit(api, plan_body("vm1", "gpu0", state_mib=0.5, drain_mib_s=16))
    response = await api.client.get(f"/v1/migrations/{status.id}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = list(parse_sse(iter(response.text.splitlines())))
    data = [MigrationEvent.model_validate_json(e.data) for e in events]
    seqs = [d.seq for d in data]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e.id for e in events] == [str(s) for s in seqs]
    assert [e.event for e in events] == [d.kind for d in data]
    assert {d.migration_id for d in data} == {status.id}
    kinds = [d.kind for d in data]
    assert kinds[0] == "phase" and "commit" in kinds and kinds[-1] == "finished"
    assert data[-1].detail == {"outcome": "succeeded", "committed": True}

    final = await wait_outcome(api, status.id)
    assert final.report is not None
    assert all(d.source_digest == d.destination_digest for d in final.report.devices)

    # Last-Event-ID resumes after that event.
    again = await api.client.get(
        f"/v1/migrations/{status.id}/events", headers={"last-event-id": "5"}
    )
    resumed = [int(e.id or 0) for e in parse_sse(iter(again.text.splitlines()))]
    assert resumed == seqs[5:]


async def test_a_quiet_event_stream_sends_keep_alive_comments(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arcs of 200 ms: a quiet stretch far longer than the keep-alive interval,
    # during which the stream must still send something.
    monkeypatch.setattr(app_module, "KEEPALIVE_S", 0.02)
    plan = plan_body("vm1", "gpu0", pre_copy=False, transition_ms=200)
    plan["downtime_limit_ms"] = 5000
    status = await submit(api, plan)
    response = await api.client.get(f"/v1/migrations/{status.id}/events")
    lines = response.text.splitlines()
    assert ": keep-alive" in lines
    # Comments are not events: a client sees the same events as without them.
    data = [MigrationEvent.model_validate_json(e.data) for e in parse_sse(iter(lines))]
    assert [d.seq for d in data] == list(range(1, len(data) + 1))
    assert data[-1].kind == "finished"


async def test_an_idempotency_key_returns_the_first_migration(api: Api) -> None:
    body = plan_body("vm1", "gpu0")
    first = await api.client.post("/v1/migrations", json=body, headers={"idempotency-key": "k1"})
    second = await api.client.post(
        "/v1/migrations", json=plan_body("vm1", "gpu9"), headers={"idempotency-key": "k1"}
    )
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    await wait_outcome(api, first.json()["id"])
    third = await api.client.post("/v1/migrations", json=body, headers={"idempotency-key": "k1"})
    assert third.status_code == 200 and third.json()["outcome"] == "succeeded"
    assert len((await api.client.get("/v1/migrations")).json()) == 1


async def test_a_device_of_an_active_migration_is_refused_with_409(api: Api) -> None:
    first = await submit(api, plan_body("vm1", "gpu0", **SLOW))
    response = await api.client.post("/v1/migrations", json=plan_body("vm2", "nic0", "gpu0"))
    error = assert_error(response, 409, "device_busy")
    assert "simulated:gpu0" in error["message"] and first.id in error["message"]
    devices = (await api.client.get("/v1/devices")).json()
    assert devices == [
        {"device": "simulated:gpu0", "backend": "simulated", "name": "gpu0", "migration": first.id}
    ]
    await wait_done(api, first.id)
    assert (await api.client.get("/v1/devices")).json()[0]["migration"] is None
    await submit(api, plan_body("vm2", "gpu0"))


async def wait_phase(api: Api, migration_id: str, phase: str, timeout_s: float = 10) -> None:
    with trio.fail_after(timeout_s):
        while True:
            status = (await api.client.get(f"/v1/migrations/{migration_id}")).json()
            if status["phase"] == phase:
                return
            await trio.sleep(0.005)


async def wait_done(api: Api, migration_id: str) -> MigrationStatus:
    """Follow the event stream: it ends once the migration has ended and freed its devices.

    (Polling shows the outcome a moment earlier, while the report is being journaled
    and the devices are still held.)"""
    with trio.fail_after(20):
        response = await api.client.get(f"/v1/migrations/{migration_id}/events")
    assert response.status_code == 200
    return await wait_outcome(api, migration_id)


async def cancel_in_precopy(api: Api, migration_id: str) -> None:
    await wait_phase(api, migration_id, "precopy")
    response = await api.client.post(f"/v1/migrations/{migration_id}/cancel")
    assert response.status_code == 202, response.text


async def test_cancel_before_the_commit_point_rolls_back(api: Api) -> None:
    status = await submit(api, plan_body("vm1", "gpu0", "gpu1", **SLOW))
    await wait_phase(api, status.id, "precopy")
    response = await api.client.post(f"/v1/migrations/{status.id}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["id"] == status.id
    final = await wait_outcome(api, status.id)
    assert final.outcome == "rolled_back" and not final.committed
    assert final.report is not None and final.report.error is not None
    assert final.report.error.kind == "cancelled"
    assert all(d.source_state == "RUNNING" for d in final.report.devices)


async def test_cancel_right_after_submit_is_refused(api: Api) -> None:
    # Cancelled while it prepares (three 1 s arcs walk the destination to
    # RESUMING): it ends before pre-copy began, every device as it was.
    status = await submit(api, plan_body("vm1", "gpu0", transition_ms=1000))
    response = await api.client.post(f"/v1/migrations/{status.id}/cancel")
    assert response.status_code == 202
    done = await wait_done(api, status.id)
    assert done.outcome == "refused"
    assert done.report is not None and done.report.error is not None
    assert done.report.error.kind == "cancelled"


async def test_cancel_after_the_end_is_409_and_unknown_is_404(api: Api) -> None:
    status = await submit(api, plan_body("vm1", "gpu0"))
    await wait_done(api, status.id)
    response = await api.client.post(f"/v1/migrations/{status.id}/cancel")
    assert "already ended" in assert_error(response, 409, "past_commit_point")["message"]
    response = await api.client.post("/v1/migrations/nope/cancel")
    assert_error(response, 404, "migration_not_found")


async def test_filters_by_outcome_and_phase(api: Api) -> None:
    done = await submit(api, plan_body("vm1", "gpu0"))
    cancelled = await submit(api, plan_body("vm2", "gpu1", **SLOW))
    await cancel_in_precopy(api, cancelled.id)
    await wait_done(api, done.id)
    await wait_done(api, cancelled.id)

    async def ids(**params: str) -> list[str]:
        response = await api.client.get("/v1/migrations", params=params)
        assert response.status_code == 200, response.text
        return [m["id"] for m in response.json()]

    assert await ids() == [cancelled.id, done.id]
    assert await ids(outcome="succeeded") == [done.id]
    assert await ids(outcome="rolled_back") == [cancelled.id]
    assert await ids(outcome="failed") == []
    assert await ids(outcome="refused") == []
    assert await ids(phase="done") == [cancelled.id, done.id]
    assert await ids(phase="precopy") == []
    assert await ids(outcome="succeeded", phase="done") == [done.id]

    error = assert_error(
        await api.client.get("/v1/migrations", params={"outcome": "great"}),
        422,
        "invalid_request",
    )
    assert [p for p, _ in problems(error)] == ["query.outcome"]
    error = assert_error(
        await api.client.get("/v1/migrations", params={"phase": "nap", "outcome": "x"}), 422
    )
    assert sorted(p for p, _ in problems(error)) == ["query.outcome", "query.phase"]


async def test_a_refused_migration_is_listed_and_shown_as_refused(api: Api) -> None:
    # As the service records one: accepted, then refused in prepare.
    journal = api.service.journal
    await journal.create("m-refused", parse_plan(plan_body("vm1", "gpu0")))
    report = MigrationReport(
        id="m-refused",
        vm="vm1",
        outcome="refused",
        duration_ms=3.0,
        phases={"prepare": 3.0},
        error=ErrorInfo(kind="peer_error", message="the destination said no", phase="prepare"),
    )
    await journal.finish("m-refused", report)
    done = await submit(api, plan_body("vm2", "gpu1"))
    await wait_done(api, done.id)

    response = await api.client.get("/v1/migrations", params={"outcome": "refused"})
    assert response.status_code == 200, response.text
    assert [m["id"] for m in response.json()] == ["m-refused"]
    response = await api.client.get("/v1/migrations", params={"outcome": "failed"})
    assert response.json() == []
    status = MigrationStatus.model_validate(
        (await api.client.get("/v1/migrations/m-refused")).json()
    )
    assert (status.outcome, status.committed, status.report) == ("refused", False, report)
    response = await api.client.post("/v1/migrations/m-refused/cancel")
    assert "already ended (refused)" in assert_error(response, 409)["message"]


async def test_fifty_migrations_at_once_all_succeed_on_their_own_devices(api: Api) -> None:
    statuses: list[MigrationStatus] = []

    async def one(i: int) -> None:
        body = plan_body(f"vm{i}", f"gpu{i}", f"nic{i}")
        # Fifty journals' writes queue behind each other: the commit record is
        # predicted (rightly) at hundreds of ms. This test is about concurrency.
        body["downtime_limit_ms"] = 60_000
        statuses.append(await submit(api, body))

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert len({s.id for s in statuses}) == 50
    finals = [await wait_done(api, s.id) for s in statuses]
    assert {f.outcome for f in finals} == {"succeeded"}
    owners: dict[str, str] = {}
    for final in finals:
        assert final.report is not None
        for device in final.report.devices:
            assert device.name not in owners, f"{device.name} in {owners[device.name]} too"
            owners[device.name] = final.vm
            assert device.source_digest == device.destination_digest
    assert len(owners) == 100
    devices = (await api.client.get("/v1/devices")).json()
    assert len(devices) == 100 and all(d["migration"] is None for d in devices)


# -- bad plans: the same problems as `orchestrator validate` ------------------------------


async def test_a_plan_of_the_wrong_shape_lists_every_problem_with_its_path(api: Api) -> None:
    body = plan_body("vm 1", "gpu0")
    body["downtime_limit_ms"] = "fast"
    body["devices"][0]["colour"] = "red"
    body["devices"].append({"backend": "simulated"})
    error = assert_error(await api.client.post("/v1/migrations", json=body), 422, "plan_error")
    with pytest.raises(PlanError) as expected:
        parse_plan(body)
    assert problems(error) == [(p.path, p.message) for p in expected.value.problems]
    paths = [path for path, _ in problems(error)]
    assert paths == ["vm", "downtime_limit_ms", "devices[0].colour", "devices[1].name"]
    assert ("devices[0].colour", "unknown field") in problems(error)


@pytest.mark.parametrize("plan_file", ["refused-non-p2p-mix.toml", "two-gpus-one-nic.toml"])
async def test_plan_files_get_the_same_answer_as_orchestrator_validate(
    api: Api, plan_file: str
) -> None:
    path = ROOT / "config" / "plans" / plan_file
    data = read_plan_data(path)
    if plan_file.startswith("refused"):
        with pytest.raises(PlanError) as expected:
            load_plan(path)
        error = assert_error(await api.client.post("/v1/migrations", json=data), 422, "plan_error")
        assert problems(error) == [(p.path, p.message) for p in expected.value.problems]
        assert "P2P" in error["message"]
    else:
        # Valid: checked, then accepted; cancelled (its devices are big).
        status = await submit(api, data)
        await cancel_in_precopy(api, status.id)
        assert (await wait_outcome(api, status.id)).outcome == "rolled_back"


async def test_backend_problems_come_from_resolve_with_their_paths(api: Api) -> None:
    body = plan_body("vm1", "gpu0", "gpu1")
    body["devices"][0]["backend"] = "warp-drive"
    body["devices"][1]["source"]["state_mib"] = -1
    error = assert_error(await api.client.post("/v1/migrations", json=body), 422, "plan_error")
    paths = [path for path, _ in problems(error)]
    assert paths == ["devices[0].backend", "devices[1].source.state_mib"]
    assert "warp-drive" in problems(error)[0][1]
    assert (await api.client.get("/v1/migrations")).json() == []


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b'{"vm": "vm1", ', "application/json", "not valid JSON"),
        (b"", "application/json", "needs a JSON plan"),
        (b"[1, 2]", "application/json", "valid dictionary"),
        (b"vm = 'vm1'", "text/plain", "valid dictionary"),
    ],
)
async def test_a_body_that_is_no_plan_is_a_clear_422(
    api: Api, content: bytes, content_type: str, message: str
) -> None:
    response = await api.client.post(
        "/v1/migrations", content=content, headers={"content-type": content_type}
    )
    error = assert_error(response, 422, "plan_error")
    assert message in error["message"]
    assert (await api.client.get("/healthz")).status_code == 200


async def test_a_body_over_the_limit_is_413_declared_or_chunked(api: Api) -> None:
    body = plan_body("vm1", "gpu0")
    body["devices"][0]["source"]["padding"] = "x" * MAX_BODY
    response = await api.client.post("/v1/migrations", json=body)
    assert "limit of 65536 bytes" in assert_error(response, 413, "body_too_large")["message"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 4096  # JSON whitespace: only the size is wrong

    response = await api.client.post(
        "/v1/migrations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "body_too_large")
    # Still serving, and nothing was started.
    assert (await api.client.get("/v1/migrations")).json() == []
    await submit(api, plan_body("vm1", "gpu0"))


# -- live control: new limits, a forced switchover ------------------------------------

#: Devices that dirty faster than they drain: at the 300 ms limit pre-copy never
#: converges (some 8 MiB to stop-copy at 8 MiB/s at best), however slow or busy
#: the machine, so a migration waits in pre-copy for the test's change.
NEVER_CONVERGING = {"state_mib": 4, "dirty_mib_s": 64, "drain_mib_s": 4}


def never_converging(vm: str) -> dict[str, Any]:
    return {
        **plan_body(vm, "gpu0", "gpu1", **NEVER_CONVERGING),
        "downtime_limit_ms": 300,
        "precopy_max_rounds": 100_000,
        "timeouts": {"precopy_s": 3600},
    }


async def in_precopy(api: Api, migration_id: str, rounds: int = 1) -> MigrationStatus:
    """Poll until ``rounds`` pre-copy rounds were decided (the deadline bounds a hang)."""
    with trio.fail_after(60):
        while True:
            response = await api.client.get(f"/v1/migrations/{migration_id}")
            status = MigrationStatus.model_validate(response.json())
            assert status.outcome is None, status
            progress = status.progress
            if status.phase == "precopy" and progress and progress.precopy_round > rounds:
                return status
            await trio.sleep(0.02)


async def test_a_raised_limit_lets_pre_copy_converge_and_is_journaled(api: Api) -> None:
    status = await submit(api, never_converging("vm-set"))
    assert status.control is not None and status.control.downtime_limit_ms == 300
    await in_precopy(api, status.id)
    body = {"downtime_limit_ms": 60_000, "bandwidth_limit_mib_s": 512}
    first = await api.client.patch(f"/v1/migrations/{status.id}", json=body)
    assert first.status_code == 200, first.text
    # The same request again: the same answer, nothing new recorded.
    again = await api.client.patch(f"/v1/migrations/{status.id}", json=body)
    assert again.status_code == 200
    assert again.json()["control"] == first.json()["control"]
    control = MigrationStatus.model_validate(first.json()).control
    assert control is not None
    assert (control.downtime_limit_ms, control.bandwidth_limit_mib_s) == (60_000, 512)
    (event,) = control.events
    assert event.action == "set" and event.phase == "precopy"
    assert {(c.field, c.before, c.after) for c in event.changes} == {
        ("downtime_limit_ms", 300, 60_000),
        ("bandwidth_limit_mib_s", None, 512),
    }

    final = await wait_outcome(api, status.id)
    assert final.outcome == "succeeded" and final.report is not None
    precopy = final.report.precopy
    assert precopy.converged and precopy.decision == "switchover"
    assert precopy.downtime_limit_ms == 60_000 and precopy.bandwidth_limit_mib_s == 512
    assert final.control == control and final.report.control == control
    # Journaled: the record and the event stream hold the change.
    record = await api.service.journal.get(status.id)
    assert record is not None and record.control == control
    kinds = [e.kind for e in await api.service.journal.events(status.id)]
    assert kinds.count("control") == 1


async def test_a_forced_switchover_ends_pre_copy_and_says_who_forced_it(api: Api) -> None:
    status = await submit(api, never_converging("vm-force"))
    await in_precopy(api, status.id)
    # 202 both times: the switchover goes on, and a retry must not fail.
    for _ in range(2):
        response = await api.client.post(f"/v1/migrations/{status.id}/switchover")
        assert response.status_code == 202, response.text
        control = MigrationStatus.model_validate(response.json()).control
        assert control is not None and control.switchover_forced
        assert [e.action for e in control.events] == ["switchover"]
    final = await wait_outcome(api, status.id)
    assert final.outcome == "succeeded" and final.report is not None
    assert final.report.precopy.decision == "switchover"
    assert not final.report.precopy.converged
    reason = final.report.precopy.reason or ""
    assert reason.startswith("switchover forced by the operator after")

    # After the end: 409, naming why.
    for response in (
        await api.client.patch(f"/v1/migrations/{status.id}", json={"downtime_limit_ms": 5}),
        await api.client.post(f"/v1/migrations/{status.id}/switchover"),
    ):
        error = assert_error(response, 409, "control_refused")
        assert "has ended (succeeded)" in error["message"]


async def test_control_of_an_unknown_migration_is_404(api: Api) -> None:
    for response in (
        await api.client.patch("/v1/migrations/nope", json={"downtime_limit_ms": 5}),
        await api.client.post("/v1/migrations/nope/switchover"),
    ):
        assert "nope" in assert_error(response, 404, "migration_not_found")["message"]


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"downtime_limit_ms": 0}, "downtime_limit_ms"),
        ({"downtime_limit_ms": 3_600_001}, "downtime_limit_ms"),
        ({"downtime_limit_ms": None}, "downtime_limit_ms"),
        ({"downtime_limit_ms": "soon"}, "downtime_limit_ms"),
        ({"bandwidth_limit_mib_s": 0}, "bandwidth_limit_mib_s"),
        ({"downtime_limit_ms": 50, "speed": 5}, "speed"),
    ],
)
async def test_a_bad_change_is_422_naming_the_field(
    api: Api, body: dict[str, Any], path: str
) -> None:
    # Checked before the id is looked up: the body is wrong whatever the migration.
    response = await api.client.patch("/v1/migrations/nope", json=body)
    error = assert_error(response, 422, "invalid_request")
    assert [p for p, _ in problems(error)] == [path]


async def test_an_empty_change_is_422(api: Api) -> None:
    error = assert_error(await api.client.patch("/v1/migrations/x", json={}), 422)
    assert "give downtime_limit_ms, bandwidth_limit_mib_s or both" in error["message"]


async def test_a_decision_credential_cannot_control_its_migration(api: Api) -> None:
    status = await submit(api, never_converging("vm-scoped"))
    token = api.service.decision_token(status.id)
    async with api.anonymous(authorization=f"Bearer {token}") as peer:
        # It opens the decision route, and nothing else: not these.
        assert (await peer.get(f"/v1/migrations/{status.id}/decision")).status_code == 200
        patch = await peer.patch(f"/v1/migrations/{status.id}", json={"downtime_limit_ms": 9})
        assert_error(patch, 403, "forbidden")
        assert_error(await peer.post(f"/v1/migrations/{status.id}/switchover"), 403, "forbidden")
    current = await api.client.get(f"/v1/migrations/{status.id}")
    assert current.json()["control"]["events"] == []
    await cancel_in_precopy(api, status.id)
    await wait_outcome(api, status.id)


async def test_the_changed_limits_survive_a_restart(tmp_path: Path) -> None:
    """A daemon killed in pre-copy after a change: the restarted one rolls the
    migration back, and its record and report keep the limits it ran under."""
    plan = parse_plan(never_converging("vm-restart"))
    async with await Journal.open(tmp_path / "state") as journal:
        # What the killed daemon left: the migration, in pre-copy, with its change.
        await journal.create("m-restart", plan)
        await journal.record_phase("m-restart", "precopy")
        changed = Control(downtime_limit_ms=300, bandwidth_limit_mib_s=None)
        changed = with_limits(
            changed, ControlRequest(downtime_limit_ms=900), at=1.0, phase="precopy"
        )
        await journal.record_control("m-restart", changed)
    async with await Journal.open(tmp_path / "state") as journal:
        service = MigrationService(journal, Metrics(CollectorRegistry()))
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            async for _ in service.follow("m-restart"):
                pass  # until the recovery journaled its outcome
            status = await service.status("m-restart")
            assert status.outcome == "rolled_back" and status.report is not None
            assert status.control == changed and status.report.control == changed
            with pytest.raises(ControlRefused, match="has ended"):
                await service.control("m-restart", ControlRequest(downtime_limit_ms=5))
            await service.shutdown(grace_s=1)
            nursery.cancel_scope.cancel()


# -- routes, methods, ids -------------------------------------------------------------


async def test_unknown_ids_routes_and_methods_are_json_errors(api: Api) -> None:
    for method, path in [
        ("GET", "/v1/migrations/nope"),
        ("POST", "/v1/migrations/nope/cancel"),
        ("GET", "/v1/migrations/nope/events"),
    ]:
        error = assert_error(await api.client.request(method, path), 404, "migration_not_found")
        assert "nope" in error["message"]
    error = assert_error(await api.client.get("/v2/anything"), 404, "not_found")
    assert "/v2/anything" in error["message"]
    response = await api.client.delete("/v1/migrations")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"
    error = assert_error(
        await api.client.get("/v1/migrations/nope/events", headers={"last-event-id": "yesterday"}),
        422,
        "invalid_request",
    )
    assert [p for p, _ in problems(error)] == ["header.Last-Event-ID"]
    # Past the journal's 64-bit sequence numbers: refused before the stream begins.
    for too_big in (str(2**63), str(10**30)):
        error = assert_error(
            await api.client.get("/v1/migrations/nope/events", headers={"last-event-id": too_big}),
            422,
            "invalid_request",
        )
        assert [p for p, _ in problems(error)] == ["header.Last-Event-ID"]
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}


async def test_an_unexpected_exception_is_a_500_without_traceback(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode() -> list[Any]:
        raise RuntimeError("a bug, with secrets in its traceback")

    monkeypatch.setattr(api.service, "devices", explode)
    error = assert_error(await api.client.get("/v1/devices"), 500, "internal_error")
    assert "secret" not in error["message"]
    monkeypatch.undo()
    assert (await api.client.get("/v1/devices")).status_code == 200


# -- authentication -----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_route_but_healthz_needs_a_valid_token(
    api: Api, method: str, path: str
) -> None:
    async with api.anonymous() as anonymous:
        response = await anonymous.request(method, path)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    async with api.anonymous(authorization="Basic dXNlcjpwYXNz") as basic:
        response = await basic.request(method, path)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    for wrong in (TOKEN[:-1], TOKEN + "x", "x" * len(TOKEN)):
        async with api.anonymous(authorization=f"Bearer {wrong}") as forger:
            assert_error(await forger.request(method, path), 403, "forbidden")


@pytest.mark.parametrize(
    ("method", "path"), [*PROTECTED, *PEER_ROUTES, ("POST", "/v1/incoming/some-id/settle")]
)
async def test_each_token_role_opens_its_routes_only(api: Api, method: str, path: str) -> None:
    """read: every GET (statuses, events, /metrics); peer: what another host's daemon
    calls; operate: everything.  A refusal names the role and what it needs."""
    for token, role, allowed in (
        (READ_TOKEN, "read", method == "GET"),
        (PEER_TOKEN, "peer", (method, path) in PEER_ROUTES),
        (TOKEN, "operate", True),
    ):
        async with api.anonymous(authorization=f"Bearer {token}") as client:
            response = await client.request(method, path, json={})
        if allowed:
            assert response.status_code != 403, (role, response.text)
        else:
            error = assert_error(response, 403, "forbidden")
            assert f"a {role} token may not {method} {path}" in error["message"]


async def test_a_read_token_watches_but_changes_nothing(api: Api) -> None:
    async with api.anonymous(authorization=f"Bearer {READ_TOKEN}") as reader:
        assert_error(await reader.post("/v1/migrations", json=plan_body("vm1", "gpu0")), 403)
        assert (await reader.get("/v1/migrations")).json() == []
        assert (await reader.get("/metrics")).status_code == 200
    status = await submit(api, plan_body("vm1", "gpu0"))
    async with api.anonymous(authorization=f"Bearer {READ_TOKEN}") as reader:
        assert_error(await reader.post(f"/v1/migrations/{status.id}/cancel"), 403)
        assert (await reader.get(f"/v1/migrations/{status.id}")).status_code == 200
    assert (await wait_outcome(api, status.id)).outcome == "succeeded"


async def test_healthz_is_open_and_any_listed_token_works(api: Api) -> None:
    async with api.anonymous() as anonymous:
        assert (await anonymous.get("/healthz")).status_code == 200
        # Unknown paths are refused before they are looked up: no probing without a token.
        assert_error(await anonymous.get("/v2/secret"), 401)
    async with api.anonymous(authorization=f"bearer {OTHER_TOKEN}") as other:
        assert (await other.get("/v1/devices")).status_code == 200


# -- probes, metrics, the OpenAPI document ----------------------------------------------


async def test_readyz_and_submissions_follow_the_service_state(api: Api) -> None:
    assert (await api.client.get("/readyz")).json() == {"ready": True}
    await api.service.shutdown(grace_s=1)
    assert "shutting down" in assert_error(await api.client.get("/readyz"), 503)["message"]
    response = await api.client.post("/v1/migrations", json=plan_body("vm1", "gpu0"))
    assert_error(response, 503, "shutting_down")
    assert (await api.client.get("/healthz")).status_code == 200


async def test_not_ready_while_recovering(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path) as journal:
        service = MigrationService(journal)  # not running: as during recovery
        app = create_app(service, registry=CollectorRegistry(), tokens=[TOKEN])
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test",
            headers={"authorization": f"Bearer {TOKEN}"},
        ) as client:
            error = assert_error(await client.get("/readyz"), 503, "not_ready")
            assert "recovering" in error["message"]
            response = await client.post("/v1/migrations", json=plan_body("vm1", "gpu0"))
            assert_error(response, 503, "not_ready")


async def test_metrics_are_the_daemons_registry_in_text_format(api: Api) -> None:
    status = await submit(api, plan_body("vm1", "gpu0"))
    await wait_done(api, status.id)
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == METRICS_CONTENT_TYPE
    assert 'orchestrator_migrations_total{outcome="succeeded"} 1.0' in response.text


async def test_the_openapi_document_is_committed_and_served(api: Api) -> None:
    assert OPENAPI_PATH.read_text(encoding="utf-8") == render_openapi(), (
        "orchestrator/api/openapi.json is out of date: run `orchestrator openapi --write`"
    )
    served = (await api.client.get("/openapi.json")).json()
    assert served == openapi_document() == json.loads(OPENAPI_PATH.read_text())
    assert served["security"] == [{"bearer": []}]
    assert served["paths"]["/healthz"]["get"]["security"] == []
    post = served["paths"]["/v1/migrations"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Plan"
    }
    assert set(post["responses"]) == {"200", "201", "401", "403", "409", "413", "422", "503"}
    # 201 is an accepted plan, not a migration that went well.
    assert "201" in post["description"] and "`refused`" in post["description"]
    (outcome,) = (
        p for p in served["paths"]["/v1/migrations"]["get"]["parameters"] if p["name"] == "outcome"
    )
    assert outcome["schema"]["anyOf"][0]["enum"] == list(get_args(Outcome))
    assert "HTTPValidationError" not in served["components"]["schemas"]


def test_the_package_exports_what_it_lists() -> None:
    import orchestrator.api

    assert sorted(orchestrator.api.__all__) == sorted(orchestrator.api._HOMES)
    for name in orchestrator.api.__all__:
        assert getattr(orchestrator.api, name) is not None
    with pytest.raises(AttributeError):
        _ = orchestrator.api.nothing_here
