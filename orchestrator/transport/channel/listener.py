"""The destination's listening socket for data channels: the handshake, then routing.

Each accepted connection is challenged (``wire.make_challenge``); a HELLO
that proves the secret of a migration this daemon expects, for a connection
of that migration not yet open, is answered with a WELCOME and handed to
its ``DestinationChannel``.  Anything else is closed and recorded; one
stranger, or one migration's broken connection, never ends the listener
that every migration shares.
"""

from __future__ import annotations

import secrets
import socket as stdlib_socket
from collections.abc import Sequence

import structlog
import trio

from orchestrator.errors import PeerAuthError, PeerError
from orchestrator.transport import wire
from orchestrator.transport.channel.ends import DestinationChannel, new_secret
from orchestrator.transport.channel.links import _configure, _receive_exactly, _send_all

__all__ = ["ChannelListener"]

log = structlog.get_logger("orchestrator.transport")


class ChannelListener:
    """The destination's listening socket: authenticates connections, routes them.

    Connections that fail the handshake (no HELLO in time, garbage, unknown
    migration, wrong secret, a connection index already taken) are closed
    and recorded in ``rejections``; the listener goes on serving the others.
    """

    def __init__(self, *, handshake_timeout_s: float = 10.0) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        self._expected: dict[str, DestinationChannel] = {}
        self.rejections: list[str] = []
        self.address: tuple[str, int] | None = None
        # Compared against when the migration id is unknown, so that the
        # answer takes as long as for a known one with a wrong secret.
        self._decoy_secret = new_secret()

    def expect(
        self, migration_id: str, secret: bytes, devices: Sequence[str]
    ) -> DestinationChannel:
        """Register a migration's channel: connections proving ``secret`` may join it."""
        if migration_id in self._expected:
            raise ValueError(f"migration {migration_id!r} is already expected")
        channel = DestinationChannel(self, migration_id, secret, devices)
        self._expected[migration_id] = channel
        return channel

    def forget(self, migration_id: str) -> None:
        self._expected.pop(migration_id, None)

    async def serve(
        self,
        host: str,
        port: int = 0,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) until cancelled.

        ``await nursery.start(listener.serve, host)`` returns the bound
        address.  Each connection runs in a task of this one's nursery.
        """
        family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
        sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
        with sock:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
            await sock.bind((host, port))
            sock.listen(128)
            bound = sock.getsockname()
            self.address = (bound[0], bound[1])
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._handle, conn)

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        with sock:
            _configure(sock)
            try:
                with trio.fail_after(self.handshake_timeout_s):
                    channel, hello = await self._handshake(sock)
            except (PeerError, OSError, trio.TooSlowError) as exc:
                reason = str(exc) or "no HELLO within the handshake timeout"
                self.rejections.append(reason)
                log.warning("channel_connection_refused", reason=reason)
                return
            try:
                await channel._run(sock, hello)
            except Exception as exc:
                # The channel is failed and its owner told (a PeerError, alone or
                # in a group); one migration's broken connection must never end
                # the listener that every other migration shares.
                log.info("channel_connection_ended", reason=str(exc), exc_info=True)

    async def _handshake(
        self, sock: trio.socket.SocketType
    ) -> tuple[DestinationChannel, wire.Hello]:
        server_nonce = secrets.token_bytes(wire.NONCE_SIZE)
        await _send_all(sock, [wire.make_challenge(server_nonce)])
        prefix = await _receive_exactly(sock, wire.HELLO_PREFIX_SIZE)
        _, _, id_length, _, _ = wire.parse_hello_prefix(prefix)
        hello = wire.parse_hello(prefix, await _receive_exactly(sock, id_length))
        channel = self._expected.get(hello.migration_id)
        secret = channel.secret if channel is not None else self._decoy_secret
        if not wire.verify_hello(secret, server_nonce, hello) or channel is None:
            raise PeerAuthError(
                f"connection for migration {hello.migration_id!r} failed authentication"
            )
        refused = channel._admit(hello)
        if refused is not None:
            raise PeerAuthError(f"migration {hello.migration_id!r}: {refused}")
        await _send_all(sock, [wire.make_welcome(secret, server_nonce, hello)])
        return channel, hello
