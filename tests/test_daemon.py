"""The real daemon: hypercorn on a Unix socket and TCP (and TLS), locks, signals, the CLI.

In-process tests run ``daemon.serve`` in the test's nursery with a
``shutdown_trigger``; the signal tests run ``orchestrator serve`` as a
subprocess, since signals belong to a process's main thread.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from orchestrator import cli, daemon, sdnotify
from orchestrator.api.client import parse_sse
from orchestrator.cli import ExitStatus
from orchestrator.daemon import DaemonError, Running
from orchestrator.journal import Journal
from orchestrator.settings import Settings
from tests.conftest import TOKEN
from tests.helpers import tls_identity

ROOT = Path(__file__).resolve().parent.parent


def plan_body(vm: str, *names: str, **source: Any) -> dict[str, Any]:
    params = {"state_mib": 0.0625, "transition_ms": 1, **source}
    return {
        "vm": vm,
        "downtime_limit_ms": 500,
        "devices": [{"name": n, "backend": "simulated", "source": params} for n in names],
    }


def settings_for(base: Path, token_file: Path, **api: Any) -> Settings:
    return Settings.load(
        flags={
            "state_dir": str(base / "state"),
            "shutdown_grace_s": 5,
            "api": {"unix_socket": str(base / "api.sock"), "token_file": str(token_file), **api},
        }
    )


@dataclass
class Daemon:
    running: Running
    stop: trio.Event


@asynccontextmanager
async def running_daemon(settings: Settings) -> AsyncIterator[Daemon]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        running = await nursery.start(partial(daemon.serve, settings, shutdown_trigger=stop.wait))
        yield Daemon(running, stop)
        stop.set()


def unix_client(path: Path, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(path)),
        base_url="http://orchestrator",
        headers=headers,
        timeout=10,
    )


async def wait_outcome(client: httpx.AsyncClient, migration_id: str) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            status: dict[str, Any] = (await client.get(f"/v1/migrations/{migration_id}")).json()
            if status["outcome"] is not None:
                return status
            await trio.sleep(0.02)


async def poll_until(
    client: httpx.AsyncClient, path: str, done: Callable[[httpx.Response], bool]
) -> None:
    with trio.fail_after(10):
        while True:
            if done(await client.get(path)):
                return
            await trio.sleep(0.01)


# -- in process ---------------------------------------------------------------------------


async def test_systemd_hears_ready_once_it_serves_and_stopping_as_it_stops(
    short_dir: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As under a unit of Type=notify: NOTIFY_SOCKET names a datagram socket.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "notify"))

    def heard() -> list[str]:
        with contextlib.suppress(BlockingIOError):
            return notify.recv(4096).decode().splitlines()
        return []

    try:
        async with running_daemon(settings_for(short_dir, token_file)) as d:
            ready = heard()
            assert "READY=1" in ready and f"MAINPID={os.getpid()}" in ready
            # Ready means serving: the API answers at once.
            async with unix_client(d.running.socket_path) as client:
                assert (await client.get("/readyz")).status_code == 200
            assert heard() == []  # nothing more while it serves
        assert "STOPPING=1" in heard()
    finally:
        notify.close()


def test_nothing_is_sent_without_a_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    # A socket that cannot be reached is logged, never raised: the daemon serves on.
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert sdnotify.notify("READY=1") is False


async def test_serves_on_the_unix_socket_and_on_tcp(short_dir: Path, token_file: Path) -> None:
    settings = settings_for(short_dir, token_file, tcp="127.0.0.1:0")
    socket_path = short_dir / "api.sock"
    async with running_daemon(settings) as d:
        assert d.running.socket_path == socket_path
        mode = os.lstat(socket_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        lock = short_dir / "api.sock.lock"
        assert lock.read_text().strip() == str(os.getpid())
        assert d.running.tcp_address is not None
        host, port = d.running.tcp_address
        assert host == "127.0.0.1" and port > 0

        async with unix_client(socket_path) as client:
            assert (await client.get("/readyz")).json()["ready"] is True
            response = await client.post("/v1/migrations", json=plan_body("vm1", "gpu0", "gpu1"))
            assert response.status_code == 201, response.text
            migration_id = response.json()["id"]
        async with unix_client(socket_path, token=None) as anonymous:
            assert (await anonymous.get("/healthz")).status_code == 200
            assert (await anonymous.get("/readyz")).status_code == 401

        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=10,
        ) as tcp:
            assert (await tcp.get("/v1/devices")).status_code == 200
            assert (
                await tcp.get("/readyz", headers={"authorization": "Bearer x"})
            ).status_code == 403
            # The event stream through the real server, read as it comes.
            async with tcp.stream("GET", f"/v1/migrations/{migration_id}/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = [line async for line in stream.aiter_lines()]
            events = list(parse_sse(iter(lines)))
            assert events[-1].event == "finished"
            assert json.loads(events[-1].data)["detail"]["outcome"] == "succeeded"
            status = await wait_outcome(tcp, migration_id)
            assert status["outcome"] == "succeeded"
            assert all(
                d["source_digest"] == d["destination_digest"] for d in status["report"]["devices"]
            )
            metrics = await tcp.get("/metrics")
            assert 'orchestrator_migrations_total{outcome="succeeded"} 1.0' in metrics.text

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(300):
                    yield b" " * 4096

            # Over the limit without a Content-Length: counted, cut, answered.
            response = await tcp.post(
                "/v1/migrations", content=chunks(), headers={"content-type": "application/json"}
            )
            assert response.status_code == 413
            assert response.json()["error"]["kind"] == "body_too_large"
            assert (await tcp.get("/readyz")).status_code == 200
    # Stopped: the socket file and the locks are gone, the journal kept the migration.
    assert not socket_path.exists() and not lock.exists()
    assert not (short_dir / "state" / "daemon.lock").exists()
    async with await Journal.open(short_dir / "state") as journal:
        record = await journal.get(migration_id)
        assert record is not None and record.outcome == "succeeded"


async def test_once_ready_the_daemon_hides_what_it_started_with_from_the_collector(
    short_dir: Path, token_file: Path
) -> None:
    """A full collection walking the modules, the app and its schemas took about
    50 ms: the daemon freezes them once started, so none lands in a downtime."""
    gc.unfreeze()
    try:
        async with running_daemon(settings_for(short_dir, token_file)):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


async def test_a_second_daemon_refuses_the_same_socket_or_state_dir(
    short_dir: Path, token_file: Path
) -> None:
    settings = settings_for(short_dir, token_file)
    async with running_daemon(settings) as d:
        pid = os.getpid()
        same_socket = settings_for(short_dir, token_file).model_copy(
            update={"state_dir": short_dir / "other-state"}
        )
        with pytest.raises(DaemonError) as exc:
            await daemon.serve(same_socket, shutdown_trigger=trio.sleep_forever)
        assert str(exc.value) == (
            f"another orchestrator daemon (pid {pid}) is serving on {short_dir / 'api.sock'}: "
            f"it holds the lock {short_dir / 'api.sock.lock'}"
        )
        same_state = settings.model_copy(
            update={"api": settings.api.model_copy(update={"unix_socket": short_dir / "b.sock"})}
        )
        with pytest.raises(DaemonError, match="uses the state directory"):
            await daemon.serve(same_state, shutdown_trigger=trio.sleep_forever)
        assert not (short_dir / "b.sock").exists()
        # The refused daemons left the first one's socket alone.
        async with unix_client(d.running.socket_path) as client:
            assert (await client.get("/readyz")).status_code == 200


async def test_a_socket_left_by_a_dead_daemon_is_replaced(
    short_dir: Path, token_file: Path
) -> None:
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(short_dir / "api.sock"))
    stale.close()
    (short_dir / "api.sock.lock").write_text("99999\n")  # a lock file nobody holds
    async with (
        running_daemon(settings_for(short_dir, token_file)) as d,
        unix_client(d.running.socket_path) as client,
    ):
        assert (await client.get("/readyz")).status_code == 200


async def test_a_file_in_the_sockets_place_is_not_removed(
    short_dir: Path, token_file: Path
) -> None:
    (short_dir / "api.sock").write_text("precious")
    with pytest.raises(Exception, match="exists and is not a socket") as exc:
        await daemon.serve(settings_for(short_dir, token_file), shutdown_trigger=trio.sleep_forever)
    assert "api.unix_socket" in str(exc.value)
    assert (short_dir / "api.sock").read_text() == "precious"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_on_tcp_with_a_self_signed_certificate(short_dir: Path, token_file: Path) -> None:
    if shutil.which("openssl") is None:
        print("skipping: no `openssl` to make a certificate with (nor the cryptography package)")
        pytest.skip("no openssl command to make a self-signed certificate")
    cert, key = _self_signed(short_dir)
    settings = settings_for(
        short_dir, token_file, tcp="127.0.0.1:0", tls_cert=str(cert), tls_key=str(key)
    )
    async with running_daemon(settings) as d:
        assert d.running.tcp_address is not None
        port = d.running.tcp_address[1]
        assert f"https://127.0.0.1:{port}" in d.running.urls
        verify = ssl.create_default_context(cafile=cert)
        async with httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{port}",
            verify=verify,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=10,
        ) as https:
            assert (await https.get("/readyz")).json()["ready"] is True
            assert (await https.get("/readyz", headers={"authorization": ""})).status_code == 401
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get("/healthz")
        # The Unix socket stays plain HTTP.
        async with unix_client(d.running.socket_path) as client:
            assert (await client.get("/readyz")).status_code == 200


async def test_a_bad_certificate_is_a_settings_error(short_dir: Path, token_file: Path) -> None:
    cert = short_dir / "cert.pem"
    cert.write_text("not a certificate\n")
    settings = settings_for(
        short_dir, token_file, tcp="127.0.0.1:0", tls_cert=str(cert), tls_key=str(cert)
    )
    with pytest.raises(Exception, match=r"api\.tls_cert: cannot use") as exc:
        await daemon.serve(settings, shutdown_trigger=trio.sleep_forever)
    assert type(exc.value).__name__ == "SettingsError"
    missing = settings_for(
        short_dir, token_file, tcp="127.0.0.1:0", tls_cert=str(cert), tls_key="/nonexistent"
    )
    with pytest.raises(Exception, match=r"api\.tls_key: cannot read /nonexistent"):
        await daemon.serve(missing, shutdown_trigger=trio.sleep_forever)


def tls_settings(base: Path, token_file: Path, **tls: str) -> Settings:
    """A daemon with a [tls] identity (``tls``: the files, overriding a good one)."""
    from tests.two_daemons import issue_identities

    (good,) = issue_identities(base, "127.0.0.1")
    files = {
        "cert_file": str(good.cert_file),
        "key_file": str(good.key_file),
        "ca_file": str(good.ca_file),
    }
    return Settings.load(
        flags={
            "state_dir": str(base / "state"),
            "shutdown_grace_s": 5,
            "api": {
                "unix_socket": str(base / "api.sock"),
                "token_file": str(token_file),
                "tcp": "127.0.0.1:0",
            },
            "data": {"listen": "127.0.0.1:0"},
            "tls": {**files, **tls},
        }
    )


async def test_the_hosts_tls_identity_serves_the_api_and_the_data_listener(
    short_dir: Path, token_file: Path
) -> None:
    settings = tls_settings(short_dir, token_file)
    assert settings.tls is not None
    async with running_daemon(settings) as d:
        assert d.running.tcp_address is not None
        port = d.running.tcp_address[1]
        verify = ssl.create_default_context(cafile=settings.tls.ca_file)
        async with httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{port}", verify=verify, timeout=10
        ) as https:
            assert (await https.get("/healthz")).status_code == 200
        listener = d.running.service.incoming.listener
        assert listener is not None and listener.tls is not None
        assert listener.max_buffered_bytes == settings.data.max_buffered_mib << 20
        async with unix_client(d.running.socket_path) as client:
            metrics = (await client.get("/metrics")).text
        assert "orchestrator_channel_buffered_bytes 0.0" in metrics
        assert (
            'orchestrator_tls_certificate_expiry_timestamp_seconds{certificate="host"}' in metrics
        )


async def test_a_bad_tls_identity_is_a_settings_error_naming_its_file(
    short_dir: Path, token_file: Path
) -> None:
    junk = short_dir / "junk.pem"
    junk.write_text("not a certificate\n")
    for field, value, expected in (
        ("cert_file", "/nonexistent.pem", r"tls\.cert_file: cannot read /nonexistent\.pem"),
        ("ca_file", str(junk), r"tls\.ca_file"),
        ("key_file", str(junk), r"tls\.cert_file: cannot use .* with the key"),
    ):
        base = short_dir / field
        base.mkdir()
        with pytest.raises(Exception, match=expected) as exc:
            await daemon.serve(
                tls_settings(base, token_file, **{field: value}),
                shutdown_trigger=trio.sleep_forever,
            )
        assert type(exc.value).__name__ == "SettingsError"


async def test_an_expired_host_certificate_stops_the_start(
    short_dir: Path, token_file: Path
) -> None:
    import datetime

    import trustme

    now = datetime.datetime.now(datetime.UTC)
    old = tls_identity(
        trustme.CA(),
        short_dir / "old",
        "127.0.0.1",
        not_before=now - datetime.timedelta(days=9),
        not_after=now - datetime.timedelta(days=2),
    )
    settings = tls_settings(
        short_dir, token_file, cert_file=str(old.cert_file), key_file=str(old.key_file)
    )
    with pytest.raises(Exception, match=r"tls\.cert_file: .* expired on") as exc:
        await daemon.serve(settings, shutdown_trigger=trio.sleep_forever)
    assert type(exc.value).__name__ == "SettingsError"


# -- the CLI client verbs against a daemon ----------------------------------------------------


async def test_cli_submit_status_watch_cancel(
    short_dir: Path, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = short_dir / "plan.json"
    plan.write_text(json.dumps(plan_body("vm-cli", "gpu0")))
    bad_plan = short_dir / "bad.json"
    bad_plan.write_text(json.dumps({**plan_body("vm-cli", "gpu0"), "downtime_limit_ms": -1}))
    conn = ["--socket", str(short_dir / "api.sock"), "--token-file", str(token_file)]

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await trio.to_thread.run_sync(cli.main, [*argv])
        out, err = capsys.readouterr()
        return code, out, err

    async with running_daemon(settings_for(short_dir, token_file)):
        code, out, _ = await run("submit", str(plan), "--json", "--idempotency-key", "k", *conn)
        assert code == 0
        migration_id = json.loads(out)["id"]
        code, out, _ = await run("submit", str(plan), "--idempotency-key", "k", *conn)
        assert code == 0 and "already submitted" in out and migration_id in out

        code, out, _ = await run("watch", migration_id, *conn)
        assert code == 0 and "succeeded" in out
        code, out, _ = await run("status", migration_id, *conn)
        assert code == 0 and f"migration {migration_id}: VM vm-cli, succeeded" in out
        code, out, _ = await run("status", migration_id, "--json", *conn)
        assert json.loads(out)["report"]["outcome"] == "succeeded"

        code, _, err = await run("cancel", migration_id, *conn)
        assert code == 2 and "already ended" in err and "409 past_commit_point" in err
        code, _, err = await run("status", "nope", *conn)
        assert code == 2 and "404 migration_not_found" in err
        code, _, err = await run("submit", str(bad_plan), *conn)
        assert code == 2 and "  downtime_limit_ms: Input should be greater than 0" in err

        wrong = short_dir / "wrong"
        wrong.write_text("wrong-token\n")
        code, _, err = await run(
            "status", migration_id, "--socket", str(short_dir / "api.sock"), "--token-file",
            str(wrong),
        )  # fmt: skip
        assert code == 2 and "403 forbidden" in err

    code, _, err = await run("status", migration_id, *conn)
    assert code == 5 and "cannot reach the orchestrator at unix:" in err
    assert "Traceback" not in err


async def test_cli_set_and_switchover(
    short_dir: Path, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = ["--socket", str(short_dir / "api.sock"), "--token-file", str(token_file)]

    # Dirtying faster than it drains: at 300 ms pre-copy goes on until told.
    def never_converging(device: str) -> dict[str, Any]:
        return {
            **plan_body("vm-set", device, state_mib=4, dirty_mib_s=64, drain_mib_s=4),
            "downtime_limit_ms": 300,
            "precopy_max_rounds": 100_000,
            "timeouts": {"precopy_s": 3600},
        }

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await trio.to_thread.run_sync(cli.main, [*argv, *conn])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    async def in_precopy(client: httpx.AsyncClient, device: str) -> str:
        # A device of its own: a migrated one stays stopped on this host.
        response = await client.post("/v1/migrations", json=never_converging(device))
        migration_id: str = response.json()["id"]

        with trio.fail_after(60):  # bounds a hang only
            while True:
                body = (await client.get(f"/v1/migrations/{migration_id}")).json()
                assert body["outcome"] is None, body
                if body["phase"] == "precopy" and body["progress"]["precopy_round"] > 1:
                    return migration_id
                await trio.sleep(0.02)

    async with (
        running_daemon(settings_for(short_dir, token_file)),
        unix_client(short_dir / "api.sock") as client,
    ):
        forced = await in_precopy(client, "gpu0")
        code, out, _ = await run("switchover", forced)
        assert code == 0 and f"migration {forced}: switchover forced" in out
        assert "downtime limit 300 ms, no bandwidth cap, switchover forced" in out
        code, out, _ = await run("watch", forced)
        assert code == 0 and "switchover forced by the operator" in out

        code, _, err = await run("set", forced, "--downtime-limit-ms", "5")
        assert code == 2 and "has ended (succeeded) (409 control_refused)" in err
        code, _, err = await run("switchover", "nope")
        assert code == 2 and "404 migration_not_found" in err
        code, _, err = await run("set", forced, "--downtime-limit-ms", "0")
        assert code == 2 and "  downtime_limit_ms: Input should be greater than 0" in err
        code, _, err = await run("set", forced)
        assert code == 2 and "give downtime_limit_ms, bandwidth_limit_mib_s or both" in err

        raised = await in_precopy(client, "gpu1")
        code, out, _ = await run("set", raised, "--bandwidth-limit-mib-s", "64")
        assert code == 0 and "downtime limit 300 ms, bandwidth cap 64 MiB/s" in out
        code, out, _ = await run(
            "set", raised, "--downtime-limit-ms", "60000", "--bandwidth-limit-mib-s", "none",
            "--json",
        )  # fmt: skip
        assert code == 0
        control = json.loads(out)["control"]
        assert (control["downtime_limit_ms"], control["bandwidth_limit_mib_s"]) == (60000, None)
        assert len(control["events"]) == 2
        code, out, _ = await run("watch", raised)
        assert code == 0 and "converged" in out

    code, _, err = await run("switchover", raised)
    assert code == 5 and "cannot reach the orchestrator" in err


@pytest.mark.parametrize(
    ("side", "state", "outcome", "code"),
    [
        # The source fails as it stops, after pre-copy: the VM stays on the source.
        ("source", "STOP_COPY", "rolled_back", 1),
        # The destination fails as it starts, past the commit: an operator is needed.
        ("destination", "RUNNING", "failed", 3),
    ],
)
async def test_cli_watch_exits_with_the_migrations_outcome(
    short_dir: Path,
    token_file: Path,
    capsys: pytest.CaptureFixture[str],
    side: str,
    state: str,
    outcome: str,
    code: int,
) -> None:
    body = plan_body("vm-cli", "gpu0")
    body["devices"][0][side] = {
        **body["devices"][0].get(side, {}),
        "fault": {"at": state, "kind": "error"},
    }
    plan = short_dir / "plan.json"
    plan.write_text(json.dumps(body))
    conn = ["--socket", str(short_dir / "api.sock"), "--token-file", str(token_file)]
    async with running_daemon(settings_for(short_dir, token_file)):
        submitted = await trio.to_thread.run_sync(cli.main, ["submit", "--json", str(plan), *conn])
        assert submitted == 0
        migration_id = json.loads(capsys.readouterr().out)["id"]
        watched = await trio.to_thread.run_sync(cli.main, ["watch", migration_id, *conn])
    out = capsys.readouterr().out
    assert f"migration {migration_id}: VM vm-cli, {outcome}, " in out
    assert watched == code, out


# -- signals: the daemon as a process -----------------------------------------------------------


def _daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


async def _start_process(
    config: Path,
    log: Path,
    *extra: str,
    module: Sequence[str] = ("orchestrator",),
    env: Mapping[str, str] | None = None,
) -> trio.Process:
    """``python -m orchestrator serve`` (or ``module``'s arguments instead of
    ``orchestrator``), its output in ``log``."""
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", *module, "--log-format", "json", "serve",
         "--config", str(config), *extra],
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**_daemon_env(), **(env or {})},
        cwd=ROOT,
    )  # fmt: skip


@asynccontextmanager
async def daemon_process(
    config: Path,
    log: Path,
    *,
    module: Sequence[str] = ("orchestrator",),
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[trio.Process]:
    """``_start_process`` for the block; killed at its end if it has not exited."""
    process = await _start_process(config, log, module=module, env=env)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _wait_ready(
    socket_path: Path,
    process: trio.Process,
    log: Path,
    seconds: float = 20,
    token: str = TOKEN,
) -> None:
    with trio.fail_after(seconds):
        while True:
            assert process.poll() is None, await trio.Path(log).read_text()
            if await trio.Path(socket_path).exists():
                async with unix_client(socket_path, token) as client:
                    try:
                        if (await client.get("/readyz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
            await trio.sleep(0.05)


async def migration_in_precopy(client: httpx.AsyncClient) -> str:
    """The id of a one-device migration, once in pre-copy: slow enough to be in
    flight for a while yet (3 MiB drained at 4 MiB/s)."""
    response = await client.post(
        "/v1/migrations", json=plan_body("vm1", "gpu0", state_mib=3, drain_mib_s=4)
    )
    assert response.status_code == 201, response.text
    migration_id: str = response.json()["id"]
    await poll_until(
        client, f"/v1/migrations/{migration_id}", lambda r: r.json()["phase"] == "precopy"
    )
    return migration_id


@pytest.mark.parametrize(("grace_s", "outcome"), [(30, "succeeded"), (0, "rolled_back")])
async def test_sigterm_with_a_migration_in_flight_exits_0_with_it_finished(
    short_dir: Path, token_file: Path, grace_s: float, outcome: str
) -> None:
    socket_path = short_dir / "api.sock"
    config = short_dir / "orchestrator.toml"
    config.write_text(
        f'state_dir = "{short_dir / "state"}"\n'
        f"shutdown_grace_s = {grace_s}\n"
        f'[api]\nunix_socket = "{socket_path}"\ntoken_file = "{token_file}"\n'
    )
    log = short_dir / "daemon.log"
    async with daemon_process(config, log) as process:
        await _wait_ready(socket_path, process, log)
        async with unix_client(socket_path) as client:
            migration_id = await migration_in_precopy(client)
            process.send_signal(signal.SIGTERM)
            if grace_s:
                # Refused from the signal on, while the one in flight finishes.
                await poll_until(client, "/readyz", lambda r: r.status_code == 503)
                response = await client.post("/v1/migrations", json=plan_body("vm2", "nic0"))
                assert response.status_code == 503
                assert response.json()["error"]["kind"] == "shutting_down"

        with trio.fail_after(20):
            code = await process.wait()
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text
    assert not socket_path.exists() and not (short_dir / "api.sock.lock").exists()
    async with await Journal.open(short_dir / "state") as journal:
        record = await journal.get(migration_id)
        assert record is not None and record.outcome == outcome, text
        assert await journal.unfinished() == []


async def test_a_second_daemon_process_on_the_same_socket_exits_5(
    short_dir: Path, token_file: Path
) -> None:
    socket_path = short_dir / "api.sock"
    config = short_dir / "orchestrator.toml"
    config.write_text(
        f'state_dir = "{short_dir / "state"}"\n'
        f'[api]\nunix_socket = "{socket_path}"\ntoken_file = "{token_file}"\n'
    )
    first_log, second_log = short_dir / "first.log", short_dir / "second.log"
    first = await _start_process(config, first_log)
    try:
        await _wait_ready(socket_path, first, first_log)
        second = await _start_process(config, second_log, "--state-dir", str(short_dir / "s2"))
        with trio.fail_after(20):
            assert await second.wait() == 5  # could not start
        text = second_log.read_text()
        assert f"another orchestrator daemon (pid {first.pid}) is serving on {socket_path}" in text
        assert "Traceback" not in text
        async with unix_client(socket_path) as client:
            assert (await client.get("/readyz")).status_code == 200
        first.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await first.wait() == 0
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()


def test_the_watch_bar_follows_the_phases() -> None:
    import io

    from orchestrator.api import MigrationEvent

    out = io.StringIO()
    bar = cli.WatchBar(out)

    def event(seq: int, kind: str, **detail: Any) -> MigrationEvent:
        return MigrationEvent(migration_id="m", seq=seq, time=0.0, kind=kind, detail=detail)

    bar.update(event(1, "phase", phase="prepare"))
    assert bar.line().startswith("[" + "-" * bar.WIDTH + "]  prepare")
    bar.update(event(2, "arc_end"))
    bar.update(event(3, "decision", action="switchover", round=4))
    bar.update(event(4, "phase", phase="stop_copy"))
    assert "stop_copy  1 state changes  pre-copy rounds 4" in bar.line()
    bar.update(event(5, "phase", phase="done"))
    assert bar.line().startswith("[" + "#" * bar.WIDTH + "]  done")
    bar.update(event(6, "phase", phase="rollback"))
    assert bar.line().startswith("[" + "<" * bar.WIDTH + "]  rollback")
    bar.clear()
    assert out.getvalue().endswith("\r\x1b[K")


def test_orchestrator_openapi_prints_the_committed_document(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from orchestrator.api import OPENAPI_PATH

    assert cli.main(["openapi"]) == 0
    assert capsys.readouterr().out == OPENAPI_PATH.read_text(encoding="utf-8")


# -- listeners that cannot start, or die -------------------------------------------------------


def data_settings(base: Path, token_file: Path, listen: str, grace_s: float = 5) -> Settings:
    return Settings.load(
        flags={
            "state_dir": str(base / "state"),
            "shutdown_grace_s": grace_s,
            "api": {"unix_socket": str(base / "api.sock"), "token_file": str(token_file)},
            "data": {"listen": listen},
        }
    )


async def test_a_data_port_in_use_stops_the_start_with_a_clear_error(
    short_dir: Path, token_file: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = data_settings(short_dir, token_file, f"127.0.0.1:{port}")
        # From the daemon's nursery, where the listeners start: `orchestrator serve`
        # prints it and exits 1 (its except* takes it out of the group).
        with pytest.RaisesGroup(DaemonError) as exc:
            await daemon.serve(settings, shutdown_trigger=trio.sleep_forever)
    (error,) = exc.value.exceptions
    assert str(error) == (
        f"cannot start the data-channel listener on 127.0.0.1:{port}: Address already in use"
    )
    assert not (short_dir / "api.sock").exists()


async def test_a_data_listener_that_dies_stops_the_daemon_which_exits_unavailable(
    short_dir: Path, token_file: Path
) -> None:
    """The issue's daemon lived on deaf after its data listener died, a migration
    in flight, and ignored SIGTERM.  Now it stops as on SIGTERM (the migration,
    with no grace, rolls back) and exits 1 for systemd to restart it."""
    socket_path = short_dir / "api.sock"
    config = short_dir / "orchestrator.toml"
    config.write_text(
        f'state_dir = "{short_dir / "state"}"\n'
        "shutdown_grace_s = 0\n"
        f'[api]\nunix_socket = "{socket_path}"\ntoken_file = "{token_file}"\n'
        '[data]\nlisten = "127.0.0.1:0"\n'
    )
    log = short_dir / "daemon.log"
    port_file = short_dir / "data.port"
    async with daemon_process(
        config,
        log,
        module=("tests.listener_child", "dies"),
        env={"LISTENER_CHILD_PORT_FILE": str(port_file)},
    ) as process:
        await _wait_ready(socket_path, process, log)
        async with unix_client(socket_path) as client:
            migration_id = await migration_in_precopy(client)
        # Any connection to the data port now breaks its listener.
        port = int(port_file.read_text())
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(30):  # bounds a hang only: the old daemon never exited
            code = await process.wait()
        await stream.aclose()
    text = log.read_text()
    # A daemon that cannot serve any more is unavailable (the CLI's exit table).
    assert code == ExitStatus.UNAVAILABLE, text
    assert (
        "orchestrator serve: the data-channel listener on 127.0.0.1:0 failed: "
        "injected: the data listener's loop broke"
    ) in text
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert [e["listener"] for e in events if e["event"] == "daemon.listener_failed"] == [
        "data-channel listener on 127.0.0.1:0"
    ]
    assert not socket_path.exists() and not (short_dir / "api.sock.lock").exists()
    async with await Journal.open(short_dir / "state") as journal:
        record = await journal.get(migration_id)
        assert record is not None and record.outcome == "rolled_back", text
        assert await journal.unfinished() == []


def _readme_block(marker: str) -> list[str]:
    """The command lines of the README's sh block after ``<!-- marker -->``, comments cut."""
    text = (ROOT / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->\n```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


async def test_the_readme_recipe_serves_here_and_migrates(tmp_path: Path) -> None:
    """`Try the daemon here`, command by command, in a scratch copy of its files: a
    fresh machine's clone has no token, no state and nothing listening yet."""
    for name in ("config/local.toml", "config/plans/one-nic-without-p2p.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    cli_words = [sys.executable, "-m", "orchestrator"]

    def words(line: str) -> list[str]:
        split = line.split()
        assert split[0] == ".venv/bin/orchestrator" or split[0] in ("install", "chmod", "python3")
        return [*cli_words, *split[1:]] if split[0] == ".venv/bin/orchestrator" else split

    *setup, serve = _readme_block("local-serve")
    for line in setup:
        await trio.run_process(line, shell=True, cwd=tmp_path)
    # The ports are the file's, but other tests' daemons may hold them: free ones.
    env = {
        **_daemon_env(),
        "ORCHESTRATOR_API__TCP": "127.0.0.1:0",
        "ORCHESTRATOR_DATA__LISTEN": "127.0.0.1:0",
    }
    log = tmp_path / "serve.log"
    process = await trio.lowlevel.open_process(
        words(serve), cwd=tmp_path, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    try:
        token = (tmp_path / ".local" / "api-tokens").read_text().strip()
        await _wait_ready(tmp_path / ".local" / "api.sock", process, log, 60, token)
        migration_id = ""
        for line in _readme_block("local-client"):
            argv = [w.replace("ID", migration_id) if w == "ID" else w for w in words(line)]
            done = await trio.run_process(argv, cwd=tmp_path, env=env, capture_stdout=True)
            out = done.stdout.decode()
            if argv[3] == "submit":
                found = re.search(r"\b([0-9a-f]{32})\b", out)
                assert found is not None, out
                migration_id = found.group(1)
        assert migration_id and "succeeded" in out, out
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            assert await process.wait() == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
