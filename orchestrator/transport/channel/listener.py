"""The destination's listening socket for data channels: the handshake, then routing.

Each accepted connection is challenged (``wire.make_challenge``); a HELLO
that proves the secret of a migration this daemon expects, for a connection
of that migration not yet open, is answered with a WELCOME and handed to
its ``DestinationChannel``.  Anything else is closed and recorded.

Anyone who can reach the data port may connect; only a source that holds a
migration's secret gets past the handshake.  What the others (strangers)
cannot do:

* End the listener.  No error of ``accept`` ends it: a shortage of
  descriptors (EMFILE, ENFILE) closes the oldest stranger to free one, or
  is waited out for ``ACCEPT_BACKOFF_S`` when there is none, as is a
  shortage of kernel memory (ENOBUFS, ENOMEM); a connection that failed
  while it waited in the backlog (ECONNABORTED, EPROTO, EPERM, and the
  network errors Linux reports from ``accept``) is skipped.  Each is
  logged, at most once per ``LOG_INTERVAL_S`` for each kind, with a count
  of those held back.  A failed handshake, or one migration's broken
  connection, ends that connection alone.  Only an error that says the
  listening socket itself is broken (EBADF, EINVAL, ...) ends ``serve``, and
  the daemon then stops rather than live on deaf.
* Use up the descriptors.  At most ``max_handshakes`` connections are in
  their handshake at once, each for at most ``handshake_timeout_s``; when
  one more arrives, the oldest still in its handshake is closed to make
  room (counted as ``evicted``).
* Keep out an expected source.  Room is made by closing the oldest, never
  by refusing the newcomer.  A source that holds the secret sends its HELLO
  as soon as the challenge reaches it, one round trip after it connected,
  and is admitted once that HELLO is read; a stranger that waits grows
  older than every connection after it.  However many idle connections
  strangers hold open, an expected source therefore gets in, unless
  ``max_handshakes`` newer connections arrive within its own handshake's
  round trip.  Once authenticated, a connection is no longer counted and
  never closed to make room.
* Grow the listener's memory.  It keeps the reasons of the last
  ``REJECTIONS_KEPT`` refusals (``rejections``) and a count for each kind
  of refusal (``statistics()``).
"""

from __future__ import annotations

import collections
import enum
import errno
import secrets
import socket as stdlib_socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog
import trio

from orchestrator.errors import PeerAuthError, PeerError
from orchestrator.transport import wire
from orchestrator.transport.channel.ends import DestinationChannel, new_secret
from orchestrator.transport.channel.links import _configure, _receive_exactly, _send_all
from orchestrator.transport.channel.tls import Relay, Secured, TlsRefused, secure

__all__ = [
    "ACCEPT_BACKOFF_S",
    "DEFAULT_MAX_HANDSHAKES",
    "LOG_INTERVAL_S",
    "REJECTIONS_KEPT",
    "ChannelListener",
    "ListenerStatistics",
    "Refusal",
]

log = structlog.get_logger("orchestrator.transport")

#: Each migration's cap on bytes received and not yet loaded by its devices.
DEFAULT_MAX_BUFFERED_BYTES = 32 << 20
#: Connections in their handshake at once, unless the listener is told otherwise.
DEFAULT_MAX_HANDSHAKES = 256
#: How long the listener waits before it accepts again after a shortage.
ACCEPT_BACKOFF_S = 0.1
#: The reasons of the last refusals kept in ``ChannelListener.rejections``.
REJECTIONS_KEPT = 100
#: A kind of accept error or refusal is logged at most once per interval.
LOG_INTERVAL_S = 10.0
BACKLOG = 128

#: Errors about the connection at the head of the backlog, not the listening
#: socket: skip it and accept the next (accept(2): Linux reports a pending
#: connection's network errors from accept).
_CONNECTION_FAILED = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,  # a firewall rule refused it
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)
#: Errors that say the process or the host is short of descriptors...
_NO_DESCRIPTOR = frozenset({errno.EMFILE, errno.ENFILE})
#: ... or of kernel memory: wait, then accept again.
_SHORTAGE = _NO_DESCRIPTOR | {errno.ENOBUFS, errno.ENOMEM}


class Refusal(enum.StrEnum):
    """Why a connection was closed in its handshake."""

    #: No HELLO within the handshake timeout.
    TIMEOUT = "timeout"
    #: What it sent is not a channel HELLO.
    MALFORMED = "malformed"
    #: Unknown migration, or the HELLO does not prove its secret.
    UNAUTHENTICATED = "unauthenticated"
    #: Its migration's channel cannot take it (the connection is open already,
    #: another count of connections was announced, the channel has failed).
    REFUSED = "refused"
    #: Closed, still in its handshake, to make room for a newer connection.
    EVICTED = "evicted"
    #: The peer closed the connection, or it failed, during the handshake.
    DISCONNECTED = "disconnected"
    #: With a TLS identity: no TLS (cleartext), or its certificate not the CA's.
    TLS = "tls"
    #: The handshake raised what it should not (a bug, logged with its traceback).
    ERROR = "error"


@dataclass(frozen=True)
class ListenerStatistics:
    """What a listener is doing and has refused, for introspection and metrics."""

    #: Connections in their handshake now (at most ``max_handshakes``).
    handshakes: int
    #: Connections closed in their handshake, by kind, since the listener was made.
    refused: Mapping[Refusal, int]
    #: Errors of ``accept`` the listener went on after, by errno name.
    accept_errors: Mapping[str, int]


class _Refused(Exception):
    def __init__(self, kind: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(eq=False)
class _Stranger:
    """A connection in its handshake: nobody knows yet whose it is."""

    sock: trio.socket.SocketType
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    evicted: bool = False
    #: The TLS relay behind ``sock``, once its TLS handshake is done.
    relay: Relay | None = None


class _LogThrottle:
    """Lets an event of each kind be logged at most once per interval, and counts
    the ones it holds back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held = collections.Counter[str]()

    def allow(self, kind: str) -> int | None:
        """None: hold this one back.  Else log it: the count held back since the last."""
        now = trio.current_time()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._held[kind] += 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)


class ChannelListener:
    """The destination's listening socket: authenticates connections, routes them.

    Connections that fail the handshake (no HELLO in time, garbage, unknown
    migration, wrong secret, a connection index already taken, closed to
    make room) are closed and recorded; the listener goes on serving the
    others.  See the module docstring for what it guarantees against
    connections that are not a migration's.
    """

    def __init__(
        self,
        *,
        handshake_timeout_s: float = 10.0,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        tls: ssl.SSLContext | None = None,
        max_buffered_bytes: int | None = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        if max_handshakes < 1:
            raise ValueError(f"max_handshakes must be at least 1, not {max_handshakes}")
        self.handshake_timeout_s = handshake_timeout_s
        self.max_handshakes = max_handshakes
        #: Every connection is TLS first (mutual: the server context requires the
        #: peer's certificate); cleartext is refused.
        self.tls = tls
        #: Each migration's cap on bytes received and not yet loaded (None: the
        #: connections' own pools alone bound them).
        self.max_buffered_bytes = max_buffered_bytes
        self._expected: dict[str, DestinationChannel] = {}
        #: The reasons of the last ``REJECTIONS_KEPT`` refusals, oldest first.
        self.rejections: collections.deque[str] = collections.deque(maxlen=REJECTIONS_KEPT)
        self._refused = collections.Counter[Refusal]()
        self._accept_errors = collections.Counter[str]()
        #: Connections in their handshake, oldest first (a dict as an ordered set).
        self._strangers: dict[_Stranger, None] = {}
        self._throttle = _LogThrottle(LOG_INTERVAL_S)
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

    def buffered_bytes(self) -> int:
        """Bytes received and not yet loaded, over every migration expected here."""
        return sum(channel.budget.outstanding for channel in self._expected.values())

    def statistics(self) -> ListenerStatistics:
        return ListenerStatistics(
            handshakes=len(self._strangers),
            refused=dict(self._refused),
            accept_errors=dict(self._accept_errors),
        )

    async def serve(
        self,
        host: str,
        port: int = 0,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) until cancelled.

        ``await nursery.start(listener.serve, host)`` returns the bound
        address; an OSError before that means it cannot listen there.  Each
        connection runs in a task of this one's nursery.  Returns only by
        cancellation; raises only if the listening socket itself fails.
        """
        family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
        sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
        with sock:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
            await sock.bind((host, port))
            sock.listen(BACKLOG)
            bound = sock.getsockname()
            self.address = (bound[0], bound[1])
            broken: OSError | None = None
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                try:
                    while True:
                        conn = await self._accept(sock)
                        if len(self._strangers) >= self.max_handshakes:
                            self._evict_oldest()
                        stranger = _Stranger(conn)
                        self._strangers[stranger] = None
                        nursery.start_soon(self._handle, stranger)
                except OSError as exc:
                    # Raised after the nursery, alone: not inside a group.
                    broken = exc
                    nursery.cancel_scope.cancel()
            if broken is not None:
                raise broken

    async def _accept(self, sock: trio.socket.SocketType) -> trio.socket.SocketType:
        """The next connection; an error of ``accept`` is skipped or waited out,
        unless it says the listening socket is broken."""
        while True:
            try:
                conn, _ = await self._accept_connection(sock)
            except OSError as exc:
                if exc.errno in _CONNECTION_FAILED:
                    self._accept_failed(exc, "skipped that connection")
                elif exc.errno in _NO_DESCRIPTOR and self._evict_oldest():
                    self._accept_failed(exc, "closed the oldest connection in its handshake")
                elif exc.errno in _SHORTAGE:
                    self._accept_failed(exc, f"accepting again in {ACCEPT_BACKOFF_S:g} s")
                    await trio.sleep(ACCEPT_BACKOFF_S)
                else:
                    raise
            else:
                return conn

    async def _accept_connection(
        self, sock: trio.socket.SocketType
    ) -> tuple[trio.socket.SocketType, object]:
        """``sock.accept()``: where tests make accept fail as a kernel would."""
        return await sock.accept()

    def _accept_failed(self, exc: OSError, action: str) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._accept_errors[name] += 1
        held_back = self._throttle.allow(f"accept:{name}")
        if held_back is not None:
            log.warning(
                "channel_accept_failed",
                error=exc.strerror or str(exc),
                errno=name,
                action=action,
                held_back=held_back,
            )

    def _evict_oldest(self) -> bool:
        """Close the oldest connection still in its handshake; False if there is none."""
        if not self._strangers:
            return False
        stranger = next(iter(self._strangers))
        del self._strangers[stranger]
        stranger.evicted = True
        stranger.scope.cancel()
        # Now, not once its task runs: the descriptor is what the room is for.
        stranger.sock.close()
        return True

    def _refuse(self, refusal: _Refused) -> None:
        self._refused[refusal.kind] += 1
        self.rejections.append(refusal.reason)
        held_back = self._throttle.allow(f"refused:{refusal.kind}")
        if held_back is not None:
            log.warning(
                "channel_connection_refused",
                kind=refusal.kind.value,
                reason=refusal.reason,
                held_back=held_back,
            )

    async def _handle(self, stranger: _Stranger) -> None:
        try:
            await self._serve_stranger(stranger)
        finally:
            stranger.sock.close()  # the TLS relay's end, where TLS replaced it

    async def _serve_stranger(self, stranger: _Stranger) -> None:
        admitted: tuple[DestinationChannel, wire.Hello] | _Refused | None = None
        try:
            with stranger.scope, trio.fail_after(self.handshake_timeout_s):
                _configure(stranger.sock)
                if self.tls is not None:
                    secured = await self._secure(stranger.sock)
                    stranger.sock, stranger.relay = secured.sock, secured.relay
                admitted = await self._handshake(stranger)
        except trio.TooSlowError:
            admitted = _Refused(Refusal.TIMEOUT, "no HELLO within the handshake timeout")
        except _Refused as exc:
            admitted = exc
        except (PeerError, OSError, trio.ClosedResourceError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            admitted = _Refused(Refusal.DISCONNECTED, detail)
        except Exception as exc:
            # A bug, which a stranger's bytes must not turn into the end of
            # the listener every migration shares.
            if self._throttle.allow("handshake_error") is not None:
                log.exception("channel_handshake_crashed")
            admitted = _Refused(Refusal.ERROR, f"the handshake failed: {exc!r}")
        finally:
            self._strangers.pop(stranger, None)
        if stranger.evicted:
            admitted = _Refused(
                Refusal.EVICTED, "closed in its handshake to make room for a newer connection"
            )
        if not isinstance(admitted, tuple):
            assert admitted is not None
            self._refuse(admitted)
            return
        channel, hello = admitted
        try:
            await channel._run(stranger.sock, hello, stranger.relay)
        except Exception as exc:
            # The channel is failed and its owner told (a PeerError, alone or
            # in a group); one migration's broken connection must never end
            # the listener that every other migration shares.
            log.info("channel_connection_ended", reason=str(exc), exc_info=True)

    async def _secure(self, sock: trio.socket.SocketType) -> Secured:
        assert self.tls is not None
        try:
            return await secure(sock, self.tls)
        except TlsRefused as exc:
            raise _Refused(Refusal.TLS, str(exc)) from None

    async def _handshake(self, stranger: _Stranger) -> tuple[DestinationChannel, wire.Hello]:
        sock = stranger.sock
        server_nonce = secrets.token_bytes(wire.NONCE_SIZE)
        await _send_all(sock, [wire.make_challenge(server_nonce)])
        prefix = await _receive_exactly(sock, wire.HELLO_PREFIX_SIZE)
        try:
            id_length = wire.parse_hello_prefix(prefix)[2]
        except PeerAuthError as exc:
            raise _Refused(Refusal.MALFORMED, str(exc)) from None
        migration_id = await _receive_exactly(sock, id_length)
        try:
            hello = wire.parse_hello(prefix, migration_id)
        except PeerAuthError as exc:
            raise _Refused(Refusal.MALFORMED, str(exc)) from None
        channel = self._expected.get(hello.migration_id)
        secret = channel.secret if channel is not None else self._decoy_secret
        if not wire.verify_hello(secret, server_nonce, hello) or channel is None:
            raise _Refused(
                Refusal.UNAUTHENTICATED,
                f"connection for migration {hello.migration_id!r} failed authentication",
            )
        # Authenticated: no longer a stranger, never closed to make room.
        self._strangers.pop(stranger, None)
        refused = channel._admit(hello)
        if refused is not None:
            raise _Refused(Refusal.REFUSED, f"migration {hello.migration_id!r}: {refused}")
        await _send_all(sock, [wire.make_welcome(secret, server_nonce, hello)])
        return channel, hello
