"""Either daemon of a migration between two hosts killed (SIGKILL) in its course.

Two `orchestrator serve` processes on loopback, each with its own state
directory (simulated devices persist there, as hardware outlives the
process driving it):

* the destination daemon killed during pre-copy: the source rolls back at
  once; the restarted destination finds its unfinished record, knows it never
  voted, and resets its devices;
* the source daemon killed after the commit point: the destination, holding
  the commit in its own journal, completes; the restarted source finds the
  commit in its journal and stops its devices, never resuming them.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.test_daemon import _start_process, _wait_ready, unix_client

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Host:
    base: Path
    config: Path
    process: trio.Process | None = None
    api_port: int | None = None

    @property
    def socket(self) -> Path:
        return self.base / "api.sock"

    async def start(self) -> None:
        log = self.base / "daemon.log"
        self.process = await _start_process(self.config, log)
        await _wait_ready(self.socket, self.process, log)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(15):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


def _host(base: Path, token_file: Path, *, destination: bool) -> Host:
    base.mkdir()
    api_port = _free_port()
    lines = [
        f'state_dir = "{base / "state"}"',
        "shutdown_grace_s = 2",
        "[api]",
        f'unix_socket = "{base / "api.sock"}"',
        f'token_file = "{token_file}"',
    ]
    # Both hosts alike: the source's API answers the destination's questions.
    lines += [f'tcp = "127.0.0.1:{api_port}"', "[data]", 'listen = "127.0.0.1:0"']
    config = base / "orchestrator.toml"
    config.write_text("\n".join(lines) + "\n")
    return Host(base, config, api_port=api_port)


@asynccontextmanager
async def two_daemons(short_dir: Path, token_file: Path) -> AsyncIterator[tuple[Host, Host]]:
    source = _host(short_dir / "a", token_file, destination=False)
    destination = _host(short_dir / "b", token_file, destination=True)
    try:
        await destination.start()
        await source.start()
        yield source, destination
    finally:
        await source.stop()
        await destination.stop()


def _plan(destination: Host, token_file: Path, **extra: Any) -> dict[str, Any]:
    devices = extra.pop("devices")
    return {
        "vm": "vm-crash",
        "downtime_limit_ms": 500,
        "destination": {
            "url": f"http://127.0.0.1:{destination.api_port}",
            "token_file": str(token_file),
        },
        "devices": devices,
        **extra,
    }


async def _status(host: Host, migration_id: str) -> dict[str, Any]:
    async with unix_client(host.socket) as client:
        body: dict[str, Any] = (await client.get(f"/v1/migrations/{migration_id}")).json()
        return body


async def _incoming(host: Host, migration_id: str) -> dict[str, Any]:
    async with unix_client(host.socket) as client:
        body: dict[str, Any] = (await client.get(f"/v1/incoming/{migration_id}")).json()
        return body


async def _until(probe: Any, done: Any, seconds: float = 30) -> dict[str, Any]:
    with trio.fail_after(seconds):
        while True:
            body: dict[str, Any] = await probe()
            if done(body):
                return body
            await trio.sleep(0.02)


async def test_destination_killed_mid_way_source_rolls_back_destination_resets_on_restart(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file) as (a, b):
        plan = _plan(
            b,
            token_file,
            bandwidth_limit_mib_s=4,
            timeouts={"device_call_s": 6},
            devices=[
                {"name": f"gpu{i}", "backend": "simulated", "source": {"state_mib": 8, "seed": i}}
                for i in range(2)
            ],
        )
        async with unix_client(a.socket) as client:
            response = await client.post("/v1/migrations", json=plan)
            assert response.status_code == 201, response.text
            migration_id = response.json()["id"]

        def streaming(status: dict[str, Any]) -> bool:
            assert status["outcome"] is None, status
            sent: int = sum((status.get("progress") or {}).get("bytes_sent", {}).values())
            return sent > 1 << 20

        await _until(lambda: _status(a, migration_id), streaming)
        b.kill()
        status = await _until(lambda: _status(a, migration_id), lambda s: s["outcome"] is not None)
        report = status["report"]
        assert status["outcome"] == "rolled_back", report
        assert report["committed"] is False
        assert report["error"]["kind"] in ("peer_error", "device_error"), report["error"]
        assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
        assert any("reset not confirmed" in note for note in report["notes"]), report["notes"]

        # The destination, restarted, rolls back what it had prepared.
        await b.start()
        far = await _until(lambda: _incoming(b, migration_id), lambda s: s["outcome"] is not None)
        assert far["outcome"] == "rolled_back", far
        assert far["committed"] is False
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}


async def test_source_killed_after_the_commit_destination_completes_source_stops_on_restart(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file) as (a, b):
        # Slow destination arcs hold the window after the commit open.
        plan = _plan(
            b,
            token_file,
            devices=[
                {
                    "name": f"nic{i}",
                    "backend": "simulated",
                    "source": {"state_mib": 0.25, "seed": i, "transition_ms": 1},
                    "destination": {"transition_ms": 700},
                }
                for i in range(2)
            ],
        )
        async with unix_client(a.socket) as client:
            response = await client.post("/v1/migrations", json=plan)
            assert response.status_code == 201, response.text
            migration_id = response.json()["id"]
        await _until(
            lambda: _incoming(b, migration_id),
            lambda s: s.get("committed") is True,
            seconds=60,
        )
        a.kill()
        far = await _until(lambda: _incoming(b, migration_id), lambda s: s["outcome"] is not None)
        assert far["outcome"] == "succeeded", far
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}

        # The source, restarted, finds the commit and stops its devices for good.
        await a.start()
        status = await _until(lambda: _status(a, migration_id), lambda s: s["outcome"] is not None)
        report = status["report"]
        assert report["committed"] is True
        assert status["outcome"] == "succeeded", report
        assert {d["source_state"] for d in report["devices"]} == {"STOP"}
        assert any("completed on restart" in note for note in report["notes"]), report["notes"]
