"""The data listener against strangers: bounded handshakes, accept errors, bounded records.

Anyone who reaches the data port may connect.  These tests hold the promises
of ``orchestrator/transport/channel/listener.py``: idle connections neither
use up the descriptors nor keep out a source the daemon expects, no error of
``accept`` a kernel reports for a shortage or a failed connection ends the
listener, and what it records of refusals stays bounded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
import trio

from orchestrator.errors import PeerAuthError
from orchestrator.settings import DataSettings
from orchestrator.transport import ChannelListener, new_secret, open_channel, wire
from orchestrator.transport.channel import listener as listener_module
from orchestrator.transport.channel.listener import (
    DEFAULT_MAX_HANDSHAKES,
    REJECTIONS_KEPT,
    Refusal,
)
from tests.channel_helpers import (
    Address,
    closed_on_us,
    drain,
    polled,
    pour,
    raw_connect,
    receive_exactly,
    serving,
)

ROOT = Path(__file__).resolve().parent.parent


def test_the_daemon_setting_defaults_to_the_listener_default() -> None:
    assert DataSettings().max_handshakes == DEFAULT_MAX_HANDSHAKES
    with pytest.raises(ValueError, match="max_handshakes must be at least 1, not 0"):
        ChannelListener(max_handshakes=0)


async def transfer(address: Address, listener: ChannelListener, migration: str) -> None:
    """An expected migration's channel connects, and its bytes and ACK cross."""
    secret = new_secret()
    dest = listener.expect(migration, secret, ["gpu0"])
    data = os.urandom(3 << 20)
    with trio.fail_after(30):
        async with open_channel(address, migration, secret, ["gpu0"]) as src:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pour, src.sender("gpu0"), data, 1 << 20)
                assert await drain(dest.receiver("gpu0")) == data
            await dest.acknowledge("gpu0")
            assert await src.acknowledged("gpu0") == len(data)
    await dest.aclose()


async def test_idle_strangers_beyond_the_bound_neither_pile_up_nor_keep_out_a_source() -> None:
    """The issue's attack, scaled down: many more idle connections than the
    bound.  The oldest are closed as newer ones arrive, at most the bound stay
    open, and a source the listener expects connects and transfers all the same."""
    bound, strangers = 8, 50
    async with serving(handshake_timeout_s=600, max_handshakes=bound) as (listener, address):
        idle = [await raw_connect(address) for _ in range(strangers)]

        def evicted() -> int:
            return listener.statistics().refused.get(Refusal.EVICTED, 0)

        await polled(lambda: evicted() == strangers - bound)
        assert listener.statistics().handshakes == bound
        # Closed oldest first: the first ones are gone, the last ones were challenged.
        for stream in idle[: strangers - bound]:
            await receive_exactly(stream, wire.CHALLENGE_SIZE)  # if it came before the close
            assert await closed_on_us(stream)
        for stream in idle[strangers - bound :]:
            assert len(await receive_exactly(stream, wire.CHALLENGE_SIZE)) == wire.CHALLENGE_SIZE

        # The strangers still hold every place; the source's two connections
        # (data and control) each take the place of the oldest.
        await transfer(address, listener, "mig-expected")
        statistics = listener.statistics()
        assert set(statistics.refused) == {Refusal.EVICTED}
        # The source's first connection took a stranger's place; its second
        # did too, unless the first was authenticated (no longer counted) by then.
        taken = statistics.refused[Refusal.EVICTED] - (strangers - bound)
        assert taken in (1, 2)
        assert statistics.handshakes == bound - taken
        for stream in idle:
            await stream.aclose()


class ScriptedAccept(ChannelListener):
    """A listener whose ``accept`` fails as a kernel's may, from a script: once a
    connection waits, each error of ``errors`` in turn, the connection left
    waiting; then it accepts."""

    def __init__(self, errors: list[int]) -> None:
        super().__init__()
        self.errors = errors

    async def _accept_connection(
        self, sock: trio.socket.SocketType
    ) -> tuple[trio.socket.SocketType, object]:
        await trio.lowlevel.wait_readable(sock)
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return await super()._accept_connection(sock)


@pytest.fixture(autouse=True)
def _log_interval_longer_than_any_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """What is logged once per interval is then logged once per test, however slow."""
    monkeypatch.setattr(listener_module, "LOG_INTERVAL_S", 1e9)


async def test_accept_errors_of_shortage_or_of_one_connection_never_end_the_listener() -> None:
    script = [
        errno.ECONNABORTED,  # that connection failed in the backlog: skip it
        errno.EMFILE,  # no stranger to close: wait, accept again
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.EPROTO,
        errno.EMFILE,
    ]
    listener = ScriptedAccept(list(script))
    with structlog.testing.capture_logs() as events:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(listener.serve, "127.0.0.1")
            await transfer(address, listener, "mig-after-errors")
            nursery.cancel_scope.cancel()
    assert listener.errors == []  # every scripted error was met, and survived
    assert listener.statistics().accept_errors == {
        "ECONNABORTED": 1,
        "EMFILE": 3,
        "ENFILE": 1,
        "ENOBUFS": 1,
        "ENOMEM": 1,
        "EPROTO": 1,
    }
    logged = [e for e in events if e["event"] == "channel_accept_failed"]
    # Once per kind within the log interval: the later EMFILEs are held back.
    assert sorted(e["errno"] for e in logged) == [
        "ECONNABORTED",
        "EMFILE",
        "ENFILE",
        "ENOBUFS",
        "ENOMEM",
        "EPROTO",
    ]
    emfile = next(e for e in logged if e["errno"] == "EMFILE")
    assert emfile["action"] == "accepting again in 0.1 s" and emfile["held_back"] == 0


async def test_running_out_of_descriptors_closes_the_oldest_stranger_for_the_newcomer() -> None:
    """EMFILE while a stranger is in its handshake: it makes room at once (no
    waiting), so the connection waiting in the backlog is accepted."""
    listener = ScriptedAccept([])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(listener.serve, "127.0.0.1")
        stranger = await raw_connect(address)
        await receive_exactly(stranger, wire.CHALLENGE_SIZE)
        # The next connection to wait (the source's first) meets EMFILE.
        listener.errors.append(errno.EMFILE)
        await transfer(address, listener, "mig-emfile")
        assert await closed_on_us(stranger)
        statistics = listener.statistics()
        assert statistics.accept_errors == {"EMFILE": 1}
        assert statistics.refused == {Refusal.EVICTED: 1}
        nursery.cancel_scope.cancel()


async def test_an_accept_error_of_a_broken_listening_socket_ends_the_listener() -> None:
    """Anything else says the listening socket itself is broken: going on would
    be a listener that hears nothing, so ``serve`` raises (the daemon stops)."""
    listener = ScriptedAccept([errno.EBADF])
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="Bad file descriptor")):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(listener.serve, "127.0.0.1")
            # A connection waits in the backlog: the accept that fails is for it.
            with socket.create_connection(address):
                await trio.sleep_forever()


async def test_what_the_listener_records_of_refusals_stays_bounded() -> None:
    refusals = REJECTIONS_KEPT + 50
    with structlog.testing.capture_logs() as events:
        async with serving() as (listener, address):
            for n in range(refusals):
                stream = await raw_connect(address)
                await receive_exactly(stream, wire.CHALLENGE_SIZE)
                await stream.send_all(f"GET /{n} HTTP/1.1\r\n\r\n".encode() + b"x" * 100)
                assert await closed_on_us(stream)
                await stream.aclose()
            await polled(lambda: sum(listener.statistics().refused.values()) == refusals)
            assert listener.statistics().refused == {Refusal.MALFORMED: refusals}
            assert len(listener.rejections) == REJECTIONS_KEPT
            assert all("did not send a channel HELLO" in r for r in listener.rejections)
    logged = [e for e in events if e["event"] == "channel_connection_refused"]
    assert len(logged) == 1 and logged[0]["kind"] == "malformed"


async def test_a_handshake_that_breaks_on_a_strangers_bytes_ends_that_connection_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever a stranger's HELLO makes the handshake raise (a bug), the
    listener refuses that connection, logs it, and serves the next."""

    def broken(secret: bytes, nonce: bytes, hello: wire.Hello) -> bool:
        raise RuntimeError("a bug in the check")

    with structlog.testing.capture_logs() as events:
        async with serving() as (listener, address):
            monkeypatch.setattr(wire, "verify_hello", broken)
            with pytest.raises(PeerAuthError, match="refused"):
                async with open_channel(address, "mig-x", new_secret(), ["gpu0"]):
                    pass
            monkeypatch.undo()
            await transfer(address, listener, "mig-after-the-bug")
            # Its data and its control connection.  The first refused, the source
            # gives up the other, which may go before its HELLO is checked.
            refused = listener.statistics().refused
            assert refused[Refusal.ERROR] >= 1
            assert refused[Refusal.ERROR] + refused.get(Refusal.DISCONNECTED, 0) == 2
            assert "the handshake failed: RuntimeError('a bug in the check')" in (
                listener.rejections
            )
    # Logged with its traceback, once in the log interval.
    crashes = [e for e in events if e["event"] == "channel_handshake_crashed"]
    assert len(crashes) == 1 and crashes[0]["exc_info"] is True


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()


async def test_a_process_out_of_descriptors_keeps_listening_and_admits_its_source() -> None:
    """A real EMFILE: the listener's process may open 20 more descriptors, and
    60 strangers connect.  Its accept fails, it goes on, and a source it
    expects still connects (each of its connections takes the place of the
    oldest stranger) and delivers its stream byte-exact."""
    secret = new_secret()
    data = os.urandom(2 << 20)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.listener_child", "short-of-descriptors", secret.hex(), "20"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
        cwd=ROOT,
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    log: list[dict[str, object]] = []
    short = trio.Event()

    async def read_log(stderr: trio.abc.ReceiveStream) -> None:
        async for line in _lines(stderr):
            event = json.loads(line)
            log.append(event)
            if event.get("event") == "channel_accept_failed" and event["errno"] == "EMFILE":
                short.set()

    try:
        with trio.fail_after(60):  # bounds a hang only
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_log, process.stderr)
                out = _lines(process.stdout)
                port = json.loads(await anext(out))["port"]
                address = ("127.0.0.1", port)
                strangers = [await raw_connect(address) for _ in range(60)]
                await short.wait()
                async with open_channel(address, "mig-emfile", secret, ["gpu0"]) as src:
                    await pour(src.sender("gpu0"), data, 1 << 20)
                    await src.acknowledged("gpu0")
                report = json.loads(await anext(out))
                assert process.poll() is None  # alive, and still listening
                for stream in strangers:
                    await stream.aclose()
                await process.stdin.aclose()
                assert await process.wait() == 0
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert report["sha256"] == hashlib.sha256(data).hexdigest()
    statistics = report["statistics"]
    assert statistics["accept_errors"]["EMFILE"] >= 2  # the strangers', then the source's
    assert statistics["refused"]["evicted"] >= 2
    assert not [e for e in log if e.get("level") == "error"], log
