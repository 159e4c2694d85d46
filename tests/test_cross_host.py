"""Migrations between two daemons: the source runs the plan, the destination
daemon (its [destination] table) prepares and loads the destination devices.

Both daemons run in this process on loopback, each with its own state
directory, API socket, TCP API and data channel listener, so that what one
host's journal or devices say is checked against the other's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from typing_extensions import Buffer

from orchestrator.peer.remote import _KeepChannel
from orchestrator.settings import Settings
from orchestrator.transport import StreamSender
from tests.test_daemon import Daemon, running_daemon, unix_client, wait_outcome


@dataclass
class Host:
    daemon: Daemon
    base: Path
    client: httpx.AsyncClient

    @property
    def api_url(self) -> str:
        address = self.daemon.running.tcp_address
        assert address is not None
        return f"http://{address[0]}:{address[1]}"

    def journal_rows(self, migration_id: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.base / "state" / "journal.sqlite3")
        try:
            return db.execute(
                "SELECT role, outcome, committed FROM migrations WHERE id = ?", (migration_id,)
            ).fetchall()
        finally:
            db.close()


@asynccontextmanager
async def host(base: Path, token_file: Path) -> AsyncIterator[Host]:
    await trio.Path(base).mkdir()
    settings = Settings.load(
        flags={
            "state_dir": str(base / "state"),
            "shutdown_grace_s": 5,
            "api": {
                "unix_socket": str(base / "api.sock"),
                "token_file": str(token_file),
                "tcp": "127.0.0.1:0",
            },
            "data": {"listen": "127.0.0.1:0"},
        }
    )
    async with running_daemon(settings) as d, unix_client(base / "api.sock") as client:
        yield Host(d, base, client)


@asynccontextmanager
async def two_hosts(short_dir: Path, token_file: Path) -> AsyncIterator[tuple[Host, Host]]:
    async with host(short_dir / "a", token_file) as a, host(short_dir / "b", token_file) as b:
        yield a, b


def cross_plan(destination: Host, token_file: Path, *names: str, **source: Any) -> dict[str, Any]:
    params = {"state_mib": 0.25, "transition_ms": 1, "dirty_mib_s": 0.5, **source}
    return {
        "vm": "vm-x",
        "downtime_limit_ms": 500,
        "destination": {"url": destination.api_url, "token_file": str(token_file)},
        "devices": [{"name": n, "backend": "simulated", "source": params} for n in names],
    }


async def submit(source: Host, plan: dict[str, Any]) -> dict[str, Any]:
    response = await source.client.post("/v1/migrations", json=plan)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return await wait_outcome(source.client, body["id"])


async def incoming(destination: Host, migration_id: str) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            response = await destination.client.get(f"/v1/incoming/{migration_id}")
            body: dict[str, Any] = response.json()
            if response.status_code == 200 and body["outcome"] is not None:
                return body
            await trio.sleep(0.02)


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
        b.daemon.running.service.incoming.listener = None
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
        response = await a.client.post("/v1/migrations", json=plan)
        assert response.status_code == 422
        assert "devices[0].destination.transition_ms" in response.text


async def test_a_data_channel_that_cannot_open_releases_the_prepared_destination(
    short_dir: Path, token_file: Path
) -> None:
    async with two_hosts(short_dir, token_file) as (a, b):
        # The destination tells the source to connect where it does not listen.
        b.daemon.running.service.incoming.advertise = "127.0.0.2"
        status = await submit(a, cross_plan(b, token_file, "gpu0"))
        assert status["outcome"] == "refused"
        assert "cannot open connection" in status["report"]["error"]["message"]
        far = await incoming(b, status["id"])
        assert far["outcome"] == "refused", far
        assert far["devices"]["gpu0"]["state"] == "RUNNING"
        # Its devices are free again: the same device migrates once reachable.
        b.daemon.running.service.incoming.advertise = None
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
