"""Two daemons, source and destination: the harness of every cross-host test.

Both hosts are alike: each has its own state directory (simulated devices
persist there, as hardware outlives the process driving it), API socket, TCP
API (the destination asks the source's for the decision) and data channel
listener.  They run either in this process (``processes=False``: tests may
reach into a daemon's service) or as ``orchestrator serve`` processes that a
test can SIGKILL and start again (``processes=True``), on loopback or each in
a network namespace of its own (a :class:`Placement`: its address and the
``ip netns exec`` that runs it there).  Statuses are read over each daemon's
API socket; journals straight from their files.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from orchestrator.settings import Settings, is_loopback
from orchestrator.transport.channel import TlsIdentity
from tests.helpers import tls_identity
from tests.test_daemon import (
    Daemon,
    _daemon_env,
    _start_process,
    _wait_ready,
    running_daemon,
    unix_client,
)


@dataclass(frozen=True)
class Placement:
    """Where a daemon runs: its address, and the command prefix that puts it there."""

    ip: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()
    #: How long a start may take (a daemon in the kernel lab's TCG guest: a minute).
    ready_s: float = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Host:
    name: str
    base: Path
    config: Path
    api_port: int
    processes: bool
    placement: Placement = Placement()
    https: bool = False
    process: trio.Process | None = None
    daemon: Daemon | None = None
    _stack: AsyncExitStack = field(default_factory=AsyncExitStack)

    @property
    def socket(self) -> Path:
        return self.base / "api.sock"

    @property
    def service(self) -> Any:
        """The daemon's service, in this process (``processes=False``)."""
        assert self.daemon is not None, "in-process daemons only"
        return self.daemon.running.service

    @property
    def api_url(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.placement.ip}:{self.api_port}"

    async def start(self) -> None:
        if self.processes:
            log = self.base / "daemon.log"
            if self.placement.prefix:
                self.process = await trio.lowlevel.open_process(
                    [*self.placement.prefix, sys.executable, "-m", "orchestrator",
                     "--log-format", "json", "serve", "--config", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log.open("wb"),
                    stderr=subprocess.STDOUT,
                    env=_daemon_env(),
                )  # fmt: skip
            else:
                self.process = await _start_process(self.config, log)
            await _wait_ready(self.socket, self.process, log, self.placement.ready_s)
        else:
            self._stack = AsyncExitStack()
            self.daemon = await self._stack.enter_async_context(
                running_daemon(Settings.load(config_file=self.config))
            )

    def kill(self) -> None:
        """SIGKILL: nothing is cleaned up, as in a crash."""
        assert self.process is not None, "kill() needs processes=True"
        os.kill(self.process.pid, signal.SIGKILL)

    async def wait_killed(self) -> None:
        assert self.process is not None
        await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM, and the daemon must be gone soon: a shutdown that hangs fails the
        test (after a SIGKILL, so that nothing is left running)."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(15):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
                raise AssertionError(f"the {self.name} daemon ignored SIGTERM for 15 s")
        if self.daemon is not None:
            self.daemon = None
            await self._stack.aclose()

    async def get(self, path: str) -> tuple[int, Any]:
        async with unix_client(self.socket) as client:
            response = await client.get(path)
            return response.status_code, response.json()

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with unix_client(self.socket) as client:
            response = await client.post(path, json=body)
            answer: dict[str, Any] = response.json()
            return response.status_code, answer

    async def status(self, migration_id: str) -> dict[str, Any]:
        body: dict[str, Any] = (await self.get(f"/v1/migrations/{migration_id}"))[1]
        return body

    async def incoming(self, migration_id: str) -> dict[str, Any]:
        body: dict[str, Any] = (await self.get(f"/v1/incoming/{migration_id}"))[1]
        return body

    async def submit(self, plan: dict[str, Any]) -> str:
        code, body = await self.post("/v1/migrations", plan)
        assert code == 201, body
        migration_id: str = body["id"]
        return migration_id

    def journal_rows(self, migration_id: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.base / "state" / "journal.sqlite3")
        try:
            return db.execute(
                "SELECT role, outcome, committed FROM migrations WHERE id = ?", (migration_id,)
            ).fetchall()
        finally:
            db.close()


def _host(
    name: str,
    base: Path,
    token_file: Path,
    processes: bool,
    placement: Placement,
    tls: TlsIdentity | None = None,
    peer_token_file: Path | None = None,
) -> Host:
    base.mkdir()
    port = free_port() if not placement.prefix else 7800
    config = base / "orchestrator.toml"
    lines = [
        f'state_dir = "{base / "state"}"',
        "shutdown_grace_s = 2",
        "[api]",
        f'unix_socket = "{base / "api.sock"}"',
        f'token_file = "{token_file}"',
        f'tcp = "{placement.ip}:{port}"',
        *([f'peer_token_file = "{peer_token_file}"'] if peer_token_file else []),
        "[data]",
        f'listen = "{placement.ip}:0"',
    ]
    if tls is None and not is_loopback(placement.ip):
        lines.append("insecure = true")  # network namespaces of one test host
    if tls is not None:
        lines += [
            "[tls]",
            f'cert_file = "{tls.cert_file}"',
            f'key_file = "{tls.key_file}"',
            f'ca_file = "{tls.ca_file}"',
        ]
    config.write_text("\n".join(lines) + "\n")
    return Host(name, base, config, port, processes, placement, https=tls is not None)


def issue_identities(base: Path, *ips: str) -> list[TlsIdentity]:
    """One identity per host address (its IP SAN), all of one new CA."""
    import trustme  # the test extra's: only TLS tests need it

    ca = trustme.CA()
    return [tls_identity(ca, base / f"tls{i}", ip, f"host{i}.test") for i, ip in enumerate(ips)]


@asynccontextmanager
async def two_daemons(
    short_dir: Path,
    token_file: Path,
    *,
    processes: bool = False,
    placements: tuple[Placement, Placement] = (Placement(), Placement()),
    tls: bool = False,
    peer_token_file: Path | None = None,
) -> AsyncIterator[tuple[Host, Host]]:
    """(source, destination), both ready; both stopped after.  ``tls``: each with a
    [tls] identity of one test CA (mutual TLS data channel, https API);
    ``peer_token_file``: the destination's tokens for other hosts' daemons."""
    ids: list[TlsIdentity | None] = [None, None]
    if tls:
        ids = list(issue_identities(short_dir, placements[0].ip, placements[1].ip))
    source = _host("source", short_dir / "a", token_file, processes, placements[0], ids[0])
    destination = _host(
        "destination",
        short_dir / "b",
        token_file,
        processes,
        placements[1],
        ids[1],
        peer_token_file,
    )
    try:
        await destination.start()
        await source.start()
        yield source, destination
    finally:
        await source.stop()
        await destination.stop()


def cross_plan(destination: Host, token_file: Path, *names: str, **source: Any) -> dict[str, Any]:
    """A plan of simulated devices ``names`` (their source parameters ``source``)."""
    params = {"state_mib": 0.25, "transition_ms": 1, "dirty_mib_s": 0.5, **source}
    return {
        "vm": "vm-x",
        "downtime_limit_ms": 500,
        "destination": {"url": destination.api_url, "token_file": str(token_file)},
        "devices": [{"name": n, "backend": "simulated", "source": params} for n in names],
    }


async def until(
    probe: Callable[[], Awaitable[dict[str, Any]]],
    done: Callable[[dict[str, Any]], bool],
    seconds: float = 30,
) -> dict[str, Any]:
    """Poll ``probe`` until ``done`` says yes; the deadline only bounds a hang."""
    with trio.fail_after(seconds):
        while True:
            body = await probe()
            if done(body):
                return body
            await trio.sleep(0.02)


def ended(body: dict[str, Any]) -> bool:
    return body.get("outcome") is not None
