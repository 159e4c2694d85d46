"""Migrations between two daemons: the source runs the plan, the destination
daemon (its [destination] table) prepares and loads the destination devices.

Both daemons run in this process (``tests.two_daemons``), so that a test may
reach into either; what one host's journal or devices say is checked against
the other's.  Crashes of either daemon are in ``test_cross_host_crash.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typing_extensions import Buffer

from orchestrator.peer import messages
from orchestrator.peer.remote import _KeepChannel
from orchestrator.transport import StreamSender
from tests.test_daemon import unix_client
from tests.test_runner import assert_ordered
from tests.two_daemons import Host, cross_plan, ended, two_daemons, until

two_hosts = two_daemons


async def submit(source: Host, plan: dict[str, Any]) -> dict[str, Any]:
    migration_id = await source.submit(plan)
    return await until(lambda: source.status(migration_id), ended)


async def incoming(destination: Host, migration_id: str) -> dict[str, Any]:
    return await until(lambda: destination.incoming(migration_id), ended)


def refused_before_any_change(status: dict[str, Any], why: str) -> None:
    """The migration ended ``refused`` for ``why``, every source device still RUNNING."""
    report = status["report"]
    assert status["outcome"] == "refused", report
    assert why in report["error"]["message"], report["error"]
    assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}


async def test_two_daemons_with_tls_migrate_over_mutual_tls_and_https(
    short_dir: Path, token_file: Path
) -> None:
    # Each daemon with a [tls] identity of one CA: the prepare call over https
    # (the destination's certificate checked against the CA and its address),
    # the data channel mutual TLS (cleartext refused by the listener).
    async with two_hosts(short_dir, token_file, tls=True) as (a, b):
        assert b.api_url.startswith("https://")
        status = await submit(a, cross_plan(b, token_file, "gpu0", "gpu1", state_mib=1))
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        listener = b.service.incoming.listener
        assert listener is not None and listener.tls is not None
        assert listener.statistics().refused == {}
        far = await incoming(b, status["id"])
        assert far["outcome"] == "succeeded"
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}
        # A destination in doubt asks the source over https, its certificate
        # checked against the same CA: the answer comes back.
        from orchestrator.peer.server import IncomingMigration
        from tests.helpers import make_resolved, sim_device

        contact = {"api": a.service.source_api, "token": a.service.decision_token(status["id"])}
        asking = IncomingMigration(
            make_resolved([sim_device("gpu0")]),
            status["id"],
            None,
            contact,
            release=lambda: None,
            ca_file=b.service.incoming.ca_file,
        )
        assert contact["api"].startswith("https://")
        answer = await asking.ask_once()
        assert isinstance(answer, messages.DecisionAnswer), answer
        assert answer.decision == "commit"


async def test_a_daemon_with_tls_never_sends_to_a_cleartext_destination(
    short_dir: Path, token_file: Path
) -> None:
    # The source has a [tls] identity, the destination's data channel none: the
    # source refuses before any device changes (no downgrade to cleartext).
    async with two_hosts(short_dir, token_file, tls=True) as (a, b):
        b.service.incoming.listener.tls = None  # as a destination without [tls] answers
        status = await submit(a, cross_plan(b, token_file, "gpu0", state_mib=0.0625))
        refused_before_any_change(status, "not encrypted")


async def test_three_devices_migrate_to_the_destination_daemon(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        status = await submit(a, cross_plan(b, token_file, "gpu0", "gpu1", "nic0"))
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        assert report["committed"] is True
        for device in report["devices"]:
            assert device["source_state"] == "STOP"
            assert device["destination_state"] == "RUNNING"
            assert device["bytes_precopy"] + device["bytes_stopcopy"] > 256 * 1024
        far = await incoming(b, status["id"])
        assert far["outcome"] == "succeeded"
        assert far["committed"] is True
        assert {n: d["state"] for n, d in far["devices"].items()} == {
            "gpu0": "RUNNING",
            "gpu1": "RUNNING",
            "nic0": "RUNNING",
        }
        # The destination host's devices hold exactly what the source's had.
        for device in report["devices"]:
            assert device["source_digest"] is not None
            assert far["devices"][device["name"]]["digest"] == device["source_digest"]
        # Both journals hold the migration under the same id and agree.
        assert a.journal_rows(status["id"]) == [("source", "succeeded", 1)]
        assert b.journal_rows(status["id"]) == [("destination", "succeeded", 1)]


async def test_a_destination_that_fails_to_load_rolls_both_hosts_back(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", "gpu1")
        plan["devices"][1]["destination"] = {
            "fault": {"at": "stream", "offset": 65536, "kind": "corrupt"}
        }
        status = await submit(a, plan)
        report = status["report"]
        assert status["outcome"] == "rolled_back", report
        assert report["committed"] is False
        assert report["error"]["side"] == "destination"
        assert report["error"]["device"] == "gpu1"
        assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
        far = await incoming(b, status["id"])
        assert far["outcome"] == "rolled_back"
        assert far["committed"] is False
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}
        assert far["devices"]["gpu1"]["reset"] is True
        assert a.journal_rows(status["id"]) == [("source", "rolled_back", 0)]
        assert b.journal_rows(status["id"]) == [("destination", "rolled_back", 0)]


async def test_a_destination_without_a_data_listener_refuses_to_prepare(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        b.service.incoming.listener = None
        status = await submit(a, cross_plan(b, token_file, "gpu0"))
        # Ended before pre-copy began, every device as it was.
        assert status["outcome"] == "refused"
        error = status["report"]["error"]
        assert error["kind"] == "peer_error"
        assert "[data] listen" in error["message"]
        assert [d["source_state"] for d in status["report"]["devices"]] == ["RUNNING"]
        # Refused before this host opened anything.
        assert status["report"]["phases"] == {"prepare": status["report"]["phases"]["prepare"]}


async def test_the_destination_validates_the_plan_with_its_own_backends(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0")
        # Valid on the source (the source table is fine), refused by the destination's
        # check of the destination table, named with its path.
        plan["devices"][0]["destination"] = {"transition_ms": -1}
        code, body = await a.post("/v1/migrations", plan)
        assert code == 422
        assert "devices[0].destination.transition_ms" in str(body)


async def test_a_data_channel_that_cannot_open_releases_the_prepared_destination(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        # The destination tells the source to connect where it does not listen.
        b.service.incoming.advertise = "127.0.0.2"
        status = await submit(a, cross_plan(b, token_file, "gpu0"))
        assert status["outcome"] == "refused"
        assert "cannot open connection" in status["report"]["error"]["message"]
        far = await incoming(b, status["id"])
        assert far["outcome"] == "refused", far
        assert far["devices"]["gpu0"]["state"] == "RUNNING"
        # Its devices are free again: the same device migrates once reachable.
        b.service.incoming.advertise = None
        again = await submit(a, cross_plan(b, token_file, "gpu0"))
        assert again["outcome"] == "succeeded", again["report"]


async def test_the_stream_to_the_destination_daemon_flushes_what_it_wraps() -> None:
    """A pre-copy round ends with ``flush``: through the wrapper that keeps the
    channel up, it must reach the channel, or the round's bytes still sit in
    the writer's queue when its bandwidth is measured."""
    calls: list[str] = []

    class Recording(StreamSender):
        async def send(self, chunk: Buffer) -> None:
            calls.append("send")

        async def flush(self) -> None:
            calls.append("flush")

        async def end(self) -> None:
            calls.append("end")

        async def aclose(self) -> None:
            calls.append("aclose")

    kept = _KeepChannel(Recording())
    await kept.send(b"x")
    await kept.flush()
    await kept.end()
    await kept.aclose()  # the channel stays up: not passed on
    assert calls == ["send", "flush", "end"]


async def test_a_destination_of_another_protocol_version_refuses_before_anything_changes(
    short_dir: Path, token_file: Path, monkeypatch: Any
) -> None:
    # A fleet mid-upgrade: the destination daemon speaks only a newer version.
    from orchestrator.peer import registry

    async with two_hosts(short_dir, token_file) as (a, b):
        monkeypatch.setattr(registry, "PROTOCOL_VERSIONS", (7, 8))
        status = await submit(a, cross_plan(b, token_file, "gpu0"))
        assert status["outcome"] == "refused", status["report"]
        error = status["report"]["error"]
        assert "no common protocol version" in error["message"], error
        assert "source speaks 1 to 3, this daemon 7 to 8" in error["message"], error
        assert [d["source_state"] for d in status["report"]["devices"]] == ["RUNNING"]
        # Nothing was prepared there: its devices are free, its journal empty.
        assert b.journal_rows(status["id"]) == []
        code, _ = await b.get(f"/v1/incoming/{status['id']}")
        assert code == 404


async def test_a_commit_or_success_before_any_data_is_refused_by_the_destination(
    short_dir: Path, token_file: Path
) -> None:
    # The old destination took commit or finish: succeeded before any data arrived.
    async with two_hosts(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", state_mib=4, drain_mib_s=1)
        migration_id = await a.submit(plan)
        await until(lambda: b.incoming(migration_id), lambda s: s.get("phase") == "transfer")
        for message in (messages.Commit(), messages.FinalOutcome("succeeded")):
            code, body = await b.post(
                f"/v1/incoming/{migration_id}/messages", messages.encode(message)
            )
            assert code == 200, body
            [reply] = body["replies"]
            assert reply["op"] == "refused" and reply["message"] == message.OP, reply
            assert body["status"]["committed"] is False
        # A decision answer only comes as the reply to the destination's own question.
        answer = messages.encode(messages.DecisionAnswer("commit"))
        code, body = await b.post(f"/v1/incoming/{migration_id}/messages", answer)
        assert code == 422, body
        assert "not a message the source sends here" in str(body)
        # The migration goes on regardless, and succeeds.
        status = await until(lambda: a.status(migration_id), ended, seconds=60)
        assert status["outcome"] == "succeeded", status["report"]


async def test_the_source_answers_a_decision_query_only_with_that_migrations_credential(
    short_dir: Path, token_file: Path
) -> None:
    import httpx

    async with two_hosts(short_dir, token_file) as (a, b):
        status = await submit(a, cross_plan(b, token_file, "gpu0"))
        migration_id = status["id"]
        token = a.service.decision_token(migration_id)
        url = f"{a.api_url}/v1/migrations/{migration_id}/decision"
        async with httpx.AsyncClient() as client:
            answer = await client.get(url, headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"op": "decision", "decision": "commit", "outcome": "succeeded"}
            # Another migration's credential opens nothing: not this decision...
            other = a.service.decision_token("other-migration")
            denied = await client.get(url, headers={"Authorization": f"Bearer {other}"})
            assert denied.status_code == 403
            # ... nor any other route.
            listing = await client.get(
                f"{a.api_url}/v1/migrations", headers={"Authorization": f"Bearer {token}"}
            )
            assert listing.status_code == 403
            # An id this daemon never journaled was never committed: abort.
            unknown = "never-seen"
            answer = await client.get(
                f"{a.api_url}/v1/migrations/{unknown}/decision",
                headers={"Authorization": f"Bearer {a.service.decision_token(unknown)}"},
            )
            assert answer.json() == {"op": "decision", "decision": "abort", "outcome": None}


async def test_settle_is_refused_for_a_migration_not_in_doubt(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        status = await submit(a, cross_plan(b, token_file, "gpu0"))
        migration_id = status["id"]
        code, body = await a.post(
            f"/v1/migrations/{migration_id}/settle", {"outcome": "succeeded", "force": True}
        )
        assert code == 409 and "not in doubt" in body["error"]["message"], body
        code, body = await b.post(f"/v1/incoming/{migration_id}/settle", {"decision": "abort"})
        assert code == 409 and "not in doubt" in body["error"]["message"], body
        code, body = await a.post("/v1/migrations/nope/settle", {"outcome": "failed"})
        assert code == 404, body


async def test_a_source_without_a_tcp_api_refuses_a_plan_to_another_host(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        a.service.source_api = None  # as a daemon without [api] tcp
        code, body = await a.post("/v1/migrations", cross_plan(b, token_file, "gpu0"))
        assert code == 422, body
        assert body["error"]["problems"][0]["path"] == "destination"
        assert "[api] tcp" in body["error"]["problems"][0]["message"]


async def test_the_destination_daemon_drives_the_destination_vcpus_itself(
    short_dir: Path, token_file: Path
) -> None:
    # Of old, the source daemon opened the plan's [vmm.destination] on its own host.
    from tests.test_vmm import FakeQmp, fake_qmps, vmm_section

    source_vmm = FakeQmp(short_dir / "src-qmp.sock", running=True)
    destination_vmm = FakeQmp(short_dir / "dst-qmp.sock", running=False, status="inmigrate")
    async with fake_qmps(source_vmm, destination_vmm), two_hosts(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", "gpu1")
        plan["vmm"] = vmm_section(source_vmm.path, destination_vmm.path)
        status = await submit(a, plan)
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        assert not source_vmm.running and destination_vmm.running
        assert "cont" not in source_vmm.commands and "stop" not in destination_vmm.commands
        # One daemon each: the destination daemon alone opened the destination's VMM.
        assert (source_vmm.connections, destination_vmm.connections) == (1, 1)
        # The downtime runs from the source's pause to the destination's resume,
        # as this (the source) host learned of it.
        vmm = report["vmm"]
        assert vmm["pause_ms"] is not None and vmm["resume_ms"] is not None, vmm
        assert vmm["destination_status"] == "running"
        assert report["downtime_ms"] is not None and report["downtime_ms"] > 0


async def test_an_abort_during_the_destinations_walk_waits_for_it_then_resets(
    short_dir: Path, token_file: Path
) -> None:
    # The reset ran beside the arcs still in flight on the destination, which then
    # crashed its migration and never journaled an outcome.
    async with two_hosts(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", state_mib=0.0625, transition_ms=200)
        plan["devices"][0]["destination"] = {"transition_ms": 1500}
        # The destination's settle walk (1.5 s an arc) overruns the switchover deadline.
        plan["timeouts"] = {"switchover_s": 1.0}
        # A limit the predicted window (those arcs) fits: the switchover is tried.
        plan["downtime_limit_ms"] = 30_000
        status = await submit(a, plan)
        assert status["outcome"] == "rolled_back", status["report"]
        assert status["report"]["error"]["kind"] == "phase_timeout"
        far = await incoming(b, status["id"])
        assert far["outcome"] == "rolled_back", far
        assert far["devices"]["gpu0"]["state"] == "RUNNING"
        assert far["devices"]["gpu0"]["reset"] is True
        assert b.journal_rows(status["id"]) == [("destination", "rolled_back", 0)]


async def test_a_strict_budget_rolls_back_both_hosts_before_the_limit_passes(
    short_dir: Path, token_file: Path
) -> None:
    # The destination's settle walk overruns its prediction by far: the source,
    # which keeps the clock, rolls both hosts back instead of pausing the VM 3 s.
    async with two_hosts(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", "gpu1", state_mib=0.0625)
        plan["devices"][1]["destination"] = {
            "fault": {"at": "RESUMING->STOP", "kind": "delay", "delay_ms": 3000}
        }
        plan["downtime_limit_ms"] = 1000
        plan["downtime_policy"] = "strict"
        status = await submit(a, plan)
        report = status["report"]
        assert status["outcome"] == "rolled_back", report
        assert report["error"]["kind"] == "downtime_budget", report["error"]
        budget = report["budget"]
        assert budget["policy"] == "strict" and budget["blown_at"] is not None
        # The pause the VM saw is reported; its bound is the mock-clock tests'
        # (this machine's load decides how late a real rollback runs).
        assert budget["pause_ms"] == report["downtime_ms"] is not None
        assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
        # The destination resets once its delayed arc ends, beside the source's return.
        far = await incoming(b, status["id"])
        assert far["outcome"] == "rolled_back", far
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}


def strict_plan(destination: Host, token_file: Path) -> dict[str, Any]:
    """Two devices under a strict budget with room to spare.  The share goes out
    as the source barrier releases; the stop arcs (50 ms) come before any stream
    can end, so it is there before the first settle."""
    plan = cross_plan(destination, token_file, "gpu0", "gpu1", state_mib=0.0625, transition_ms=50)
    plan["downtime_limit_ms"] = 5000
    plan["downtime_policy"] = "strict"
    return plan


async def test_the_destination_takes_its_share_of_a_strict_budget_as_durations(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        status = await submit(a, strict_plan(b, token_file))
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        share = report["budget"]["destination_share"]
        assert share is not None and 0 < share["left_ms"] < 5000
        far = await incoming(b, status["id"])
        # What the destination took: the same durations, and a check before each
        # device's settle and before its vote, on its own clock from the receipt.
        taken = far["report"]["share"]
        assert taken["taken"] and taken["left_ms"] == share["left_ms"], (taken, share)
        steps = sorted((c["step"], c["device"]) for c in taken["checks"])
        assert steps == [("settle_arcs", "gpu0"), ("settle_arcs", "gpu1"), ("vote", None)], taken
        assert all(c["fits"] and 0 <= c["elapsed_ms"] < 5000 for c in taken["checks"])


async def test_a_destination_over_its_share_rolls_both_hosts_back_before_settling(
    short_dir: Path, token_file: Path, monkeypatch: Any
) -> None:
    # The share's arithmetic has its own tests; here it leaves the destination
    # nothing, so that the refusal crosses the wire: the destination begins no
    # settle and answers OverBudget, the source rolls back naming its step, and
    # the destination resets the devices it left in RESUMING.
    from orchestrator.engine import Share, budget

    monkeypatch.setattr(budget.DowntimeBudget, "share", lambda self, flow, rtt_s: Share(0.0, 0.001))
    async with two_hosts(short_dir, token_file) as (a, b):
        status = await submit(a, strict_plan(b, token_file))
        report = status["report"]
        assert status["outcome"] == "rolled_back", report
        assert report["error"]["kind"] == "downtime_budget", report["error"]
        assert "at the destination, before settle_arcs of gpu" in report["error"]["message"]
        assert report["budget"]["blown_at"] == "settle_arcs (destination)"
        assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
        far = await incoming(b, status["id"])
        assert far["outcome"] == "rolled_back", far
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}
        taken = far["report"]["share"]
        assert taken["taken"] and taken["checks"], taken
        # Each settle refused before it began (none of the checks fit).
        assert not any(c["fits"] for c in taken["checks"]), taken


async def test_a_daemon_with_tls_never_sends_its_secret_to_an_http_url(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file, tls=True) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", state_mib=0.0625)
        plan["destination"]["url"] = plan["destination"]["url"].replace("https://", "http://")
        status = await submit(a, plan)
        refused_before_any_change(status, "is not https")


async def test_a_daemon_without_tls_is_told_the_destination_requires_it(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file, tls=True) as (a, b):
        a.service.tls = None  # as a source without [tls] ...
        plan = cross_plan(b, token_file, "gpu0", state_mib=0.0625)
        # ... that trusts the destination's API by the plan's (deprecated) CA file.
        plan["destination"]["ca_file"] = str(short_dir / "tls1" / "ca.pem")
        status = await submit(a, plan)
        refused_before_any_change(status, "requires TLS")


async def test_a_destination_of_protocol_1_gets_no_share_and_still_migrates(
    short_dir: Path, token_file: Path, monkeypatch: Any
) -> None:
    # A fleet mid-upgrade: a destination that knows no ``Budget`` is never sent one.
    from orchestrator.peer import registry

    async with two_hosts(short_dir, token_file) as (a, b):
        monkeypatch.setattr(registry, "PROTOCOL_VERSIONS", (1,))
        plan = cross_plan(b, token_file, "gpu0", state_mib=0.0625)
        plan["downtime_limit_ms"] = 5000
        plan["downtime_policy"] = "strict"
        status = await submit(a, plan)
        assert status["outcome"] == "succeeded", status["report"]
        assert status["report"]["budget"]["destination_share"] is None
        far = await incoming(b, status["id"])
        assert far["report"]["share"] is None


async def test_the_destinations_declared_arcs_reach_the_sources_forecast(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", state_mib=0.0625)
        plan["devices"][0]["destination"] = {"transition_ms": 7}
        plan["downtime_limit_ms"] = 5000
        status = await submit(a, plan)
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        device = report["precopy"]["forecast"]["devices"]["gpu0"]
        # From the destination's prepare answer: RESUMING -> STOP -> RUNNING_P2P, then RUNNING.
        assert device["settle_arcs"] == {"ms": 14.0, "source": "declared"}
        assert device["run_arcs"] == {"ms": 7.0, "source": "declared"}
        window = report["window"]
        assert window["devices"]["gpu0"]["settle_arcs"]["measured_ms"] >= 14.0


async def test_a_completed_lost_on_an_open_channel_is_asked_for_over_rest(
    short_dir: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in bench/downtime_promise.py: the destination ended succeeded, its
    # Completed never left, the channel stayed open, and the source waited in
    # resume until it was shut down.  Here the destination drops it outright.
    from orchestrator.peer import protocol as p
    from orchestrator.peer.server import IncomingMigration

    emit = IncomingMigration._emit

    def drop_completed(
        self: IncomingMigration, message: p.Message, replies: list[p.Message] | None = None
    ) -> None:
        if isinstance(message, p.Completed) and replies is None:
            return
        emit(self, message, replies)

    monkeypatch.setattr(IncomingMigration, "_emit", drop_completed)
    async with two_hosts(short_dir, token_file) as (a, b):
        status = await submit(a, cross_plan(b, token_file, "gpu0", "gpu1"))
        assert status["outcome"] == "succeeded", status["report"]
        far = await incoming(b, status["id"])
        assert far["outcome"] == "succeeded", far


async def test_the_source_daemon_takes_live_control_and_the_destination_refers_to_it(
    short_dir: Path, token_file: Path
) -> None:
    # Dirtying faster than it drains: at 300 ms pre-copy goes on until told.
    async with two_hosts(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", "gpu1", state_mib=4, dirty_mib_s=64, drain_mib_s=4)
        plan.update(downtime_limit_ms=300, precopy_max_rounds=100_000, timeouts={"precopy_s": 3600})
        migration_id = await a.submit(plan)

        def rounds_under_way(body: dict[str, Any]) -> bool:
            assert body["outcome"] is None, body
            return bool(body["phase"] == "precopy" and body["progress"]["precopy_round"] > 1)

        await until(lambda: a.status(migration_id), rounds_under_way, seconds=60)
        path = f"/v1/migrations/{migration_id}"
        async with unix_client(b.socket) as far:
            for response in (
                await far.patch(path, json={"downtime_limit_ms": 60_000}),
                await far.post(f"{path}/switchover"),
            ):
                assert response.status_code == 409, response.text
                message = response.json()["error"]["message"]
                assert "ask the source" in message and a.api_url in message
        async with unix_client(a.socket) as near:
            response = await near.patch(path, json={"bandwidth_limit_mib_s": 64})
            assert response.status_code == 200, response.text
            assert response.json()["control"]["bandwidth_limit_mib_s"] == 64
            response = await near.post(f"{path}/switchover")
            assert response.status_code == 202, response.text
        status = await until(lambda: a.status(migration_id), ended)
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        assert report["precopy"]["reason"].startswith("switchover forced by the operator")
        assert report["precopy"]["bandwidth_limit_mib_s"] == 64
        assert [e["action"] for e in status["control"]["events"]] == ["set", "switchover"]
        far_status = await incoming(b, migration_id)
        assert far_status["outcome"] == "succeeded"
        for device in report["devices"]:
            assert far_status["devices"][device["name"]]["digest"] == device["source_digest"]


async def test_the_destination_answers_with_its_hosts_history_labelled_so(
    short_dir: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Devices that declare nothing (as VFIO's): after three migrations the
    # destination daemon's own history gives the source its post-load arcs.
    from orchestrator.backends.simulated import SimulatedDevice

    monkeypatch.setattr(SimulatedDevice, "declared_arc_s", lambda self, a, b: None)
    monkeypatch.setattr(SimulatedDevice, "model_key", lambda self: "simulated/test-model")
    async with two_hosts(short_dir, token_file) as (a, b):
        reports = []
        for i in range(4):
            plan = cross_plan(b, token_file, f"gpu{i}", state_mib=0.0625)
            plan["devices"][0]["destination"] = {"transition_ms": 5}
            plan["downtime_limit_ms"] = 5000
            status = await submit(a, plan)
            assert status["outcome"] == "succeeded", status["report"]
            reports.append(status["report"])
    first = reports[0]["precopy"]["forecast"]["devices"]["gpu0"]
    last = reports[3]["precopy"]["forecast"]["devices"]["gpu3"]
    assert first["run_arcs"]["source"] != "history"
    assert last["run_arcs"]["source"] == "history"
    assert last["run_arcs"]["ms"] >= 5.0


async def test_one_device_without_p2p_joins_by_order_between_two_daemons(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", "gpu1", "nic0")
        plan["devices"][2]["source"] = {**plan["devices"][2]["source"], "p2p": False}
        status = await submit(a, plan)
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        assert [stage["devices"] for stage in report["order"]["destination"]] == [
            ["gpu0", "gpu1"],
            ["nic0"],
            ["gpu0", "gpu1"],
        ]
        # The source's journal holds both hosts' arcs in the order they happened
        # (the destination's as it reported them, one after another).
        events = [
            (e.kind, e.side, e.device, e.to_state)
            async for e in a.service.follow(status["id"])
            if e.kind in ("arc_begin", "arc_end")
        ]
        assert_ordered(events, "nic0")
        far = await incoming(b, status["id"])
        assert {n: d["state"] for n, d in far["devices"].items()} == dict.fromkeys(
            ("gpu0", "gpu1", "nic0"), "RUNNING"
        )


async def test_a_source_daemon_needs_only_a_peer_token_of_its_destination(
    short_dir: Path, token_file: Path
) -> None:
    peer_tokens = short_dir / "peer-tokens"
    peer_token = "peer-token-of-host-a-0123456789abcdef"
    peer_tokens.write_text(f"{peer_token}\n")
    peer_tokens.chmod(0o600)
    async with two_hosts(short_dir, token_file, peer_token_file=peer_tokens) as (a, b):
        plan = cross_plan(b, token_file, "gpu0")
        plan["destination"]["token_file"] = str(peer_tokens)
        status = await submit(a, plan)
        assert status["outcome"] == "succeeded", status["report"]
        # The same token opens nothing else of the destination's API.
        async with unix_client(b.socket, token=peer_token) as peer:
            response = await peer.get("/v1/migrations")
            assert response.status_code == 403
            error = response.json()["error"]
            assert "a peer token may not GET /v1/migrations" in error["message"]
