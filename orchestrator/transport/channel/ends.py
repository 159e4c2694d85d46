"""One migration's data channel, as each side holds it: its two ends.

``SourceChannel`` (made by ``open_channel``) and ``DestinationChannel``
(made by ``ChannelListener.expect``) route each device's stream over its
data connection (``wire.connection_of``) and CONTROL messages over the
control connection; each gives one stream end per device
(``NetworkStreamSender`` / ``NetworkStreamReceiver``).

Failure is all-or-nothing per migration: the first protocol violation,
authentication failure after the handshake, ABORT, or connection cut fails
the whole channel.  From then on every pending and future operation on it
raises that ``PeerError`` (``PeerProtocolError`` names the device, the frame
and what was wrong); nothing received after the bad frame, nor anything
still queued, reaches a device.  The side that detects a violation tells
the other with an ABORT where it can, then closes every connection.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import socket as stdlib_socket
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio
from typing_extensions import Buffer

from orchestrator.errors import PeerAuthError, PeerError, PeerProtocolError
from orchestrator.transport import wire
from orchestrator.transport.channel.buffers import ByteBudget, _BufferPool, _give_back
from orchestrator.transport.channel.bulk import _Backlog, _Pump, _Sink, _view
from orchestrator.transport.channel.links import (
    _configure,
    _ControlLink,
    _flush_quietly,
    _Link,
    _make_link,
    _ReadOutcome,
    _receive_exactly,
    _send_all,
    _split,
    _tell_abort,
)
from orchestrator.transport.channel.tls import Relay, TlsPeer, secure
from orchestrator.transport.streams import (
    BlockingReader,
    BlockingWriter,
    RateLimiter,
    StreamReceiver,
    StreamSender,
    Transfer,
)

if TYPE_CHECKING:
    from orchestrator.transport.channel.listener import ChannelListener

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "ChannelStatistics",
    "DestinationChannel",
    "NetworkStreamReceiver",
    "NetworkStreamSender",
    "SourceChannel",
    "default_connections",
    "new_secret",
    "open_channel",
]

log = structlog.get_logger("orchestrator.transport")

DEFAULT_MAX_CONNECTIONS = 4
#: CONTROL messages received and not yet read before the channel fails.
CONTROL_BACKLOG = 1024
#: How long telling the peer why the channel failed may take.
ABORT_GRACE_S = 1.0


def new_secret() -> bytes:
    """A fresh per-migration secret for the prepare call to hand out."""
    return secrets.token_bytes(32)


def default_connections(devices: int) -> int:
    """One connection per device, at most ``DEFAULT_MAX_CONNECTIONS``."""
    return max(1, min(devices, DEFAULT_MAX_CONNECTIONS))


@dataclass(frozen=True)
class ChannelStatistics:
    """What moved over a channel, for the pre-copy decision and reports.

    ``busy_s`` is the wall time during which at least one send was under way
    (source) or between the first and the latest DATA frame (destination);
    idle time between pre-copy rounds does not dilute the throughput.
    """

    payload_bytes: int
    busy_s: float
    connections: int

    @property
    def throughput_bytes_s(self) -> float | None:
        return self.payload_bytes / self.busy_s if self.busy_s > 0 else None


# -- what both ends share -----------------------------------------------------


class _Channel:
    """Failure, control messages and connections: what both ends of a channel share."""

    role: wire.Role

    def __init__(self, migration_id: str, devices: Sequence[str]) -> None:
        if len(devices) > wire.MAX_DEVICES:
            raise ValueError(f"at most {wire.MAX_DEVICES} devices per channel")
        if len(set(devices)) != len(devices):
            raise ValueError("device names must be unique")
        self.migration_id = migration_id
        self.devices = list(devices)
        self._index = {name: i for i, name in enumerate(self.devices)}
        #: The data connections, by index.
        self._links: dict[int, _Link] = {}
        self._control: _ControlLink | None = None
        self.failure: PeerError | None = None
        self._failed = trio.Event()
        # Unbounded, as the connection's reader posts without waiting; a peer
        # that floods CONTROL messages unread fails the channel instead.
        self._control_send, self._control_receive = trio.open_memory_channel[dict[str, Any]](
            math.inf
        )
        self._payload_bytes = 0
        self._busy_s = 0.0

    @property
    def connections(self) -> int:
        """The data connections (the control connection comes on top)."""
        return len(self._links)

    def device_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no device {name!r} in migration {self.migration_id!r}") from None

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(self._payload_bytes, self._busy_s, len(self._links))

    def _blame(self, transfer: Transfer) -> None:
        """A transfer that ended on a stream error while the channel failed: the
        channel's failure is the reason to report (the error is its consequence)."""
        if isinstance(transfer.error, PeerError) and self.failure is not None:
            transfer.error = self.failure

    def check(self) -> None:
        """Raise the channel's failure, if it has failed."""
        if self.failure is not None:
            raise self.failure

    def _link_of(self, device: int) -> _Link:
        """The data connection a device's frames travel on."""
        self.check()
        index = wire.connection_of(device, len(self._links))
        link = self._links.get(index)
        if link is None:
            raise PeerError(f"connection {index} of migration {self.migration_id!r} is not open")
        return link

    def _control_link(self) -> _ControlLink:
        self.check()
        if self._control is None:
            raise PeerError(
                f"the control connection of migration {self.migration_id!r} is not open"
            )
        return self._control

    def _every_link(self) -> list[_Link | _ControlLink]:
        links: list[_Link | _ControlLink] = list(self._links.values())
        if self._control is not None:
            links.append(self._control)
        return links

    # Failure ---------------------------------------------------------------

    def _fail(self, error: PeerError, *, closing: bool = False, close_links: bool = True) -> None:
        """Fail the channel: wake every waiter with ``error``; close the connections."""
        if self.failure is not None:
            return
        self.failure = error
        self._failed.set()
        self._control_send.close()
        self._wake_all()
        if close_links:
            self._close_links()
        if not closing:
            log.warning(
                "channel_failed",
                migration=self.migration_id,
                side=self.role.value,
                error=str(error),
            )

    def _close_links(self) -> None:
        for link in self._every_link():
            link.close()

    def _wake_all(self) -> None:
        """Subclasses wake their own waiters."""

    async def _fail_and_tell(self, error: PeerError, reason: str) -> None:
        """Fail at once (this is the reason, whatever the peer does next), tell the
        peer why with an ABORT on every connection, then close them."""
        if self.failure is not None:
            return
        self._fail(error, close_links=False)
        links = self._every_link()
        with trio.CancelScope(shield=True), trio.move_on_after(ABORT_GRACE_S):
            # Queued behind the frames already on their way, each written whole.
            async with trio.open_nursery() as nursery:
                for link in links:
                    nursery.start_soon(_tell_abort, link, reason)
        self._close_links()

    async def abort(self, reason: str) -> None:
        """Fail the migration's channel on both sides; the peer learns ``reason``."""
        await self._fail_and_tell(PeerError(f"the channel was aborted here: {reason}"), reason)

    async def aclose(self) -> None:
        """Send what is queued (for at most ``ABORT_GRACE_S``), then close every
        connection; streams not ended are cut."""
        error = PeerError(f"the channel of migration {self.migration_id!r} is closed")
        try:
            if self.failure is None:
                with trio.CancelScope(shield=True), trio.move_on_after(ABORT_GRACE_S):
                    async with trio.open_nursery() as nursery:
                        for link in self._every_link():
                            nursery.start_soon(_flush_quietly, link)
        finally:
            self._fail(error, closing=True)
        await trio.lowlevel.checkpoint()

    async def _serve_link(
        self, link: _Link | _ControlLink, validator: wire.InboundValidator
    ) -> None:
        """Run one connection to its end, failing the channel on any error."""

        async def ended(outcome: _ReadOutcome) -> None:
            if isinstance(outcome, PeerProtocolError):
                await self._fail_and_tell(outcome, f"protocol violation: {outcome}")
            elif outcome is not None:
                self._fail(outcome)
            else:
                self._link_eof(link, validator)

        try:
            await link.run(validator, self._deliver, self._fail, ended)
        finally:
            link.close()

    def _deliver(self, event: wire.Event, pool: _BufferPool) -> None:
        """In the trio thread, in arrival order: one verified event of a connection."""
        if self.failure is not None:
            _give_back(event, pool)
            return
        if isinstance(event, wire.Abort):
            peer = "destination" if self.role is wire.Role.SOURCE else "source"
            self._fail(PeerError(f"the {peer} aborted the migration: {event.reason}"))
        elif isinstance(event, wire.Control):
            if self._control_send.statistics().current_buffer_used >= CONTROL_BACKLOG:
                unread = f"more than {CONTROL_BACKLOG} CONTROL messages unread"
                self._fail(PeerProtocolError(unread))
                return
            self._control_send.send_nowait(event.message)
        else:
            self._deliver_device_event(event, pool)

    def _deliver_device_event(self, event: wire.Event, pool: _BufferPool) -> None:
        raise NotImplementedError

    def _link_eof(self, link: _Link | _ControlLink, validator: wire.InboundValidator) -> None:
        raise NotImplementedError

    # Control messages ------------------------------------------------------

    async def send_control(self, message: Mapping[str, Any], *, wait: bool = False) -> None:
        """Send a small JSON object to the peer, on the control connection, in order.

        Returns once queued; with ``wait``, once in the kernel's hands, so that
        a shielded caller knows the message survives its scope's cancellation
        (a cancelled channel's connections are shut down, queue and all).
        """
        link = self._control_link()
        await link.write_frame(lambda encoder: _split(encoder.control(dict(message))), wait=wait)

    async def receive_control(self) -> dict[str, Any]:
        """The peer's next CONTROL message; PeerError once the channel failed or closed."""
        self.check()
        try:
            message = await self._control_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self.check()
            raise PeerError("the peer closed the channel's control stream") from None
        self.check()
        return message


# -- source side -----------------------------------------------------------------


class NetworkStreamSender(StreamSender):
    """The source end of one device's stream over the data channel."""

    def __init__(self, channel: SourceChannel, name: str, index: int) -> None:
        self._channel = channel
        self.name = name
        self.index = index
        self.bytes_sent = 0
        self.ended = False
        self._closed = False
        self._pumping: Transfer | None = None

    @property
    def pumps(self) -> bool:  # type: ignore[override]
        """Bulk transfers go straight to the connection, unless a rate limit paces them."""
        limiter = self._channel.limiter
        return limiter is None or limiter.bytes_per_s is None

    def start_pump(
        self, reader: BlockingReader, *, limit: int | None = None, end: bool = False
    ) -> Transfer:
        """Read ``reader`` into this stream in its connection's writer thread (see
        ``bulk.py``), up to ``limit`` bytes or until it has nothing more now; returns
        at once.  Once the transfer is done its bytes count as sent; until then
        nothing else may be sent on this stream.  ``end``: at the reader's end the
        thread sends the stream's END too (the stream is then ``ended``).
        """
        self._check_can_send()
        channel = self._channel
        link = channel._link_of(self.index)
        pump = _Pump(self.index, reader, limit, self.bytes_sent if end else None)
        transfer = self._pumping = pump.transfer
        busy = channel._busy()
        busy.__enter__()
        # A rate set meanwhile ends the transfer: what is left goes paced.
        limiter = channel.limiter
        unwatch = limiter.watch(transfer.stop) if limiter is not None else None

        def done(transfer: Transfer) -> None:
            busy.__exit__(None, None, None)
            if unwatch is not None:
                unwatch()
            self.bytes_sent += transfer.bytes
            if transfer.ended_stream:
                self.ended = True
            channel._payload_bytes += transfer.bytes
            channel._blame(transfer)

        transfer.on_done(done)
        link.start_pump(pump)
        return transfer

    def _check_can_send(self) -> None:
        """Refuse to add to a stream that ended, was closed, or is pumping."""
        if self.ended or self._closed:
            raise trio.ClosedResourceError(f"the stream of device {self.name!r} is closed")
        if self._pumping is not None and not self._pumping.finished:
            raise trio.BusyResourceError(f"device {self.name!r} is pumping")

    async def send(self, chunk: Buffer) -> None:
        """Send a chunk (any buffer: bytes, bytearray, memoryview), in frames of at most 4 MiB.

        ``bytes`` (or a view of them) cannot change, so the send returns once
        its frames are queued to the connection's writer; any other buffer
        once its frames are in the kernel's hands.
        """
        self._check_can_send()
        view = memoryview(chunk).cast("B")
        immutable = isinstance(view.obj, bytes)
        channel = self._channel
        link = channel._link_of(self.index)
        limiter = channel.limiter
        with channel._busy():
            for start in range(0, view.nbytes, wire.MAX_DATA_PAYLOAD):
                part = view[start : start + wire.MAX_DATA_PAYLOAD]
                if limiter is not None:
                    await limiter.consume(part.nbytes)
                await channel._guarded(
                    link.write(wire.Kind.DATA, self.index, part, wait=not immutable)
                )
                self.bytes_sent += part.nbytes
                channel._payload_bytes += part.nbytes

    async def flush(self) -> None:
        """Return once every frame of this device sent so far is in the kernel's hands."""
        await self._channel._guarded(self._channel._link_of(self.index).flush())

    async def end(self) -> None:
        self._check_can_send()
        link = self._channel._link_of(self.index)
        index, total = self.index, self.bytes_sent
        await self._channel._guarded(
            link.write_frame(lambda encoder: _split(encoder.end(index, total)), ends=index)
        )
        self.ended = True

    async def aclose(self) -> None:
        """After ``end``: nothing.  Before: the stream is cut, which fails the channel."""
        if self.ended or self._closed:
            return
        self._closed = True
        if self._channel.failure is None:
            await self._channel.abort(f"the source closed device {self.name!r}'s stream early")


class SourceChannel(_Channel):
    """The source host's end of one migration's data channel."""

    role = wire.Role.SOURCE

    def __init__(
        self, migration_id: str, devices: Sequence[str], limiter: RateLimiter | None
    ) -> None:
        super().__init__(migration_id, devices)
        self.limiter = limiter
        self.senders = {
            name: NetworkStreamSender(self, name, i) for i, name in enumerate(self.devices)
        }
        self._acked: dict[int, int] = {}
        self._ack_events = {i: trio.Event() for i in range(len(self.devices))}
        #: Devices whose connection ended: no ACK will come for them any more.
        self._acks_ended: set[int] = set()
        self._sending = 0
        self._busy_since = 0.0

    def sender(self, device: str) -> NetworkStreamSender:
        return self.senders[self.devices[self.device_index(device)]]

    @contextlib.contextmanager
    def _busy(self) -> Any:
        if self._sending == 0:
            self._busy_since = trio.current_time()
        self._sending += 1
        try:
            yield
        finally:
            self._sending -= 1
            if self._sending == 0:
                self._busy_s += trio.current_time() - self._busy_since

    async def _guarded(self, operation: Awaitable[None]) -> None:
        """Run a write; if the channel failed meanwhile, its failure is the error to raise.

        A destination that refuses a frame sends an ABORT saying why, then
        closes: a write may see the close before the reader has read the
        ABORT, so give the reader a moment to find the reason.
        """
        try:
            await operation
        except PeerError:
            with trio.move_on_after(ABORT_GRACE_S):
                await self._failed.wait()
            self.check()
            raise

    def is_acknowledged(self, device: str, *, at_least: int = 0) -> bool:
        """The destination acknowledged at least ``at_least`` bytes of the device's stream."""
        return self._acked.get(self.device_index(device), -1) >= at_least

    async def acknowledged(self, device: str, *, at_least: int = 0) -> int:
        """Wait for the destination's acknowledgement that this device's initial data is loaded.

        Returns the byte count the destination had received for the device
        when it acknowledged.  With ``at_least``, an ACK of fewer bytes does not
        count (it acknowledged initial data that has grown since): this waits
        for the next.  PeerError if the channel fails first.
        """
        index = self.device_index(device)
        while True:
            self.check()
            loaded = self._acked.get(index, -1)
            if loaded >= at_least:
                return loaded
            if index in self._acks_ended:
                break
            await self._ack_events[index].wait()
        self.check()
        raise PeerError(f"the destination closed device {device!r}'s connection without an ACK")

    async def all_acknowledged(self) -> None:
        """Wait until every device has been acknowledged (the switchover-ack barrier)."""
        for device in self.devices:
            await self.acknowledged(device)

    def in_flight_bytes(self) -> int:
        """Bytes sent and not yet delivered to the destination host's kernel, over
        every connection: subtract them from what was sent to measure the link."""
        return sum(link.in_flight_bytes() for link in self._links.values())

    def _deliver_device_event(self, event: wire.Event, pool: _BufferPool) -> None:
        assert isinstance(event, wire.Ack)
        index = event.device
        self._acked[index] = max(self._acked.get(index, 0), event.loaded_bytes)
        # Wake this ACK's waiters; a later ACK (more initial data) wakes the next.
        woken, self._ack_events[index] = self._ack_events[index], trio.Event()
        woken.set()

    def _wake_all(self) -> None:
        for event in self._ack_events.values():
            event.set()

    def _link_eof(self, link: _Link | _ControlLink, validator: wire.InboundValidator) -> None:
        unfinished = [
            self.devices[i]
            for i in sorted(validator.own)
            if not self.senders[self.devices[i]].ended
        ]
        if unfinished:
            self._fail(
                PeerError(
                    f"the destination closed connection {link.index} before the end of "
                    f"{', '.join(unfinished)}"
                )
            )
            return
        for i in validator.own:
            self._acks_ended.add(i)
            self._ack_events[i].set()
        if validator.control:
            self._control_send.close()


async def _connect_link(
    address: tuple[str, int],
    migration_id: str,
    secret: bytes,
    index: int,
    connections: int,
    tls: TlsPeer | None = None,
) -> _Link | _ControlLink:
    sock = trio.socket.socket(
        stdlib_socket.AF_INET6 if ":" in address[0] else stdlib_socket.AF_INET,
        stdlib_socket.SOCK_STREAM,
    )
    try:
        _configure(sock)
        try:
            await sock.connect(address)
            relay = None
            if tls is not None:
                secured = await secure(sock, tls.context, server_hostname=tls.hostname)
                sock, relay = secured.sock, secured.relay
            server_nonce = wire.parse_challenge(await _receive_exactly(sock, wire.CHALLENGE_SIZE))
            client_nonce = secrets.token_bytes(wire.NONCE_SIZE)
            hello_bytes = wire.client_hello(
                secret, server_nonce, migration_id, index, connections, client_nonce
            )
            await _send_all(sock, [hello_bytes])
            prefix = hello_bytes[: wire.HELLO_PREFIX_SIZE]
            hello = wire.parse_hello(prefix, hello_bytes[wire.HELLO_PREFIX_SIZE :])
            try:
                welcome = await _receive_exactly(sock, wire.WELCOME_SIZE)
            except PeerAuthError:
                raise PeerAuthError(
                    f"the destination refused connection {index} of migration {migration_id!r} "
                    "(unknown migration, wrong secret, or a connection already taken)"
                ) from None
            wire.verify_welcome(secret, server_nonce, hello, welcome)
        except OSError as exc:
            raise PeerError(
                f"cannot open connection {index} to {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
    except BaseException:
        sock.close()
        raise
    return _make_link(sock, index, connections, relay)


@contextlib.asynccontextmanager
async def open_channel(
    address: tuple[str, int],
    migration_id: str,
    secret: bytes,
    devices: Sequence[str],
    *,
    parallel_connections: int | None = None,
    limiter: RateLimiter | None = None,
    connect_timeout_s: float = 10.0,
    tls: TlsPeer | None = None,
) -> AsyncIterator[SourceChannel]:
    """Open the source's end of a migration's data channel to a destination's listener.

    Opens ``parallel_connections`` data connections (default: one per device,
    at most 4) and the control connection, each authenticated both ways;
    raises PeerAuthError if the
    destination refuses or cannot prove it holds ``secret``, PeerError if it
    cannot be reached within ``connect_timeout_s``.  Leaving the block closes
    the channel: streams not ended by then are cut.  With ``tls`` every
    connection is TLS first, the destination's certificate checked against its
    name (PeerError says why a handshake failed).
    """
    connections = parallel_connections or default_connections(len(devices))
    if not 1 <= connections <= min(wire.MAX_CONNECTIONS, max(len(devices), 1)):
        raise ValueError(
            f"parallel_connections must be 1..{min(wire.MAX_CONNECTIONS, max(len(devices), 1))}"
        )
    channel = SourceChannel(migration_id, devices, limiter)
    links: dict[int, _Link | _ControlLink] = {}

    async def connect(index: int) -> None:
        links[index] = await _connect_link(address, migration_id, secret, index, connections, tls)

    try:
        with trio.fail_after(connect_timeout_s):
            async with trio.open_nursery() as nursery:
                # The data connections, then the control connection (index ``connections``).
                for index in range(connections + 1):
                    nursery.start_soon(connect, index)
    except trio.TooSlowError:
        for link in links.values():
            link.close()
        raise PeerError(
            f"the destination {address[0]}:{address[1]} did not accept the channel "
            f"within {connect_timeout_s:g} s"
        ) from None
    except BaseException as exc:
        for link in links.values():
            link.close()
        if isinstance(exc, BaseExceptionGroup):
            peer, _ = exc.split(PeerError)
            if peer is not None:
                raise peer.exceptions[0] from None
        raise
    for index, link in sorted(links.items()):
        if isinstance(link, _ControlLink):
            channel._control = link
        else:
            channel._links[index] = link
    async with trio.open_nursery() as nursery:
        for index, link in sorted(links.items()):
            validator = wire.InboundValidator(wire.Role.SOURCE, devices, index, connections)
            nursery.start_soon(channel._serve_link, link, validator)
        try:
            yield channel
        finally:
            await channel.aclose()
            nursery.cancel_scope.cancel()


# -- destination side ----------------------------------------------------------------

#: What a device's queue holds: a verified payload piece and the pool it is
#: lent from, or the end of the stream.
_Item = tuple[wire.Piece, _BufferPool] | None


class NetworkStreamReceiver(StreamReceiver):
    """The destination end of one device's stream over the data channel.

    Pieces are lent: ``receive_lent`` returns a view of the connection's
    pool buffer into which the kernel received the bytes, and takes it back
    at the next call (or ``aclose``); ``receive`` returns a copy of its own.
    """

    def __init__(self, channel: DestinationChannel, name: str, index: int) -> None:
        self._channel = channel
        self.name = name
        self.index = index
        self.bytes_received = 0
        self.ended = False
        # Unbounded: what it holds is bounded by the connection's buffer pool.
        self._send, self._receive = trio.open_memory_channel[_Item](math.inf)
        self._lent: tuple[memoryview, _BufferPool] | None = None
        self._sink: _Sink | None = None
        #: Whether the sink's transfer is over and its bytes in ``bytes_received``.
        self._sink_counted = False

    sinks = True

    def start_sink(self, writer: BlockingWriter) -> Transfer:
        """Load the rest of the stream into ``writer`` in its connection's reader thread
        (see ``bulk.py``); returns at once.  The transfer is done at the stream's END
        (every byte before it loaded), at a failed write, or when the channel fails.
        """
        channel = self._channel
        channel.check()
        if self._sink is not None or self.ended:
            raise trio.ClosedResourceError(f"the stream of device {self.name!r} is taken")
        self._give_back()
        sink = self._sink = _Sink(f"{channel.migration_id}-{self.name}", writer)
        transfer = sink.transfer
        # What trio had taken already goes first, then the link hands over the rest.
        taken: list[_Item] = []
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            while True:
                taken.append(self._receive.receive_nowait())
        backlog: _Backlog = [(_view(i[0]), i[1]) if i is not None else None for i in taken]
        # Counted in the channel's statistics when trio took them.
        counted = sum(len(i[0]) for i in taken if i is not None)
        if channel._first_data_at is None:
            channel._first_data_at = trio.current_time()
        link = channel._open_link_of(self.index)
        if link is not None:
            link.attach_sink(self.index, sink, backlog)
        else:  # attached as the connection opens: nothing can have arrived yet
            assert not backlog
        if channel.failure is not None:
            sink.fail(channel.failure)

        def done(transfer: Transfer) -> None:
            self._sink_counted = True
            self.bytes_received += transfer.bytes
            channel._payload_bytes += max(0, transfer.bytes - counted)
            if channel._first_data_at is not None:
                channel._busy_s = trio.current_time() - channel._first_data_at
            if transfer.error is None:
                self.ended = True
            channel._blame(transfer)

        transfer.on_done(done)
        return transfer

    @property
    def loaded_bytes(self) -> int:
        """Bytes handed to the device's consumer (or loaded by its sink) so far."""
        sink = self._sink
        if sink is None or self._sink_counted:
            return self.bytes_received
        return self.bytes_received + sink.transfer.bytes

    def _give_back(self) -> None:
        if self._lent is not None:
            view, pool = self._lent
            self._lent = None
            pool.give(view)

    async def receive_lent(self) -> memoryview | None:
        """The next verified piece of payload, lent until the next receive or ``aclose``."""
        self._give_back()
        if self.ended:
            return None
        channel = self._channel
        channel.check()
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            channel.check()
            raise PeerError(f"the stream of device {self.name!r} was cut before its end") from None
        if channel.failure is not None:
            if item is not None:
                item[1].give(item[0])
            raise channel.failure
        if item is None:
            self.ended = True
            return None
        piece, pool = item
        self.bytes_received += len(piece)
        if isinstance(piece, memoryview):
            self._lent = (piece, pool)
            return piece
        return memoryview(piece)

    async def receive(self) -> bytes | None:
        """The next verified piece of payload, as ``bytes`` of the caller's own (a copy)."""
        view = await self.receive_lent()
        if view is None:
            return None
        data = bytes(view)
        self._give_back()
        return data

    async def aclose(self) -> None:
        """After the end: nothing.  Before: the stream is refused, which fails the channel."""
        self._give_back()
        self._receive.close()
        if not self.ended and self._channel.failure is None:
            await self._channel.abort(f"the destination closed device {self.name!r}'s stream")


class DestinationChannel(_Channel):
    """The destination host's end of one migration's data channel."""

    role = wire.Role.DESTINATION

    def __init__(
        self,
        listener: ChannelListener,
        migration_id: str,
        secret: bytes,
        devices: Sequence[str],
    ) -> None:
        super().__init__(migration_id, devices)
        if len(secret) < wire.MIN_SECRET:
            raise ValueError(f"a channel secret has at least {wire.MIN_SECRET} bytes")
        self._listener = listener
        self.secret = secret
        self.receivers = {
            name: NetworkStreamReceiver(self, name, i) for i, name in enumerate(self.devices)
        }
        self.expected_connections: int | None = None
        self._connected = trio.Event()
        self._first_data_at: float | None = None
        #: Bytes received and not yet loaded, under the listener's cap.
        self.budget = ByteBudget(listener.max_buffered_bytes)

    def receiver(self, device: str) -> NetworkStreamReceiver:
        return self.receivers[self.devices[self.device_index(device)]]

    def _open_link_of(self, device: int) -> _Link | None:
        """The data connection a device's frames travel on, if it is open yet."""
        if self.expected_connections is None:
            return None
        return self._links.get(wire.connection_of(device, self.expected_connections))

    async def wait_connected(self) -> None:
        """Wait until every connection the source announced is authenticated."""
        self.check()
        await self._connected.wait()
        self.check()

    def _admit(self, hello: wire.Hello) -> str | None:
        """Why this connection cannot join the channel, or None if it can."""
        if self.failure is not None:
            return "the channel has failed"
        if hello.connections > max(len(self.devices), 1):
            return f"{hello.connections} connections for {len(self.devices)} devices"
        if self.expected_connections is None:
            self.expected_connections = hello.connections
        elif hello.connections != self.expected_connections:
            return f"{hello.connections} connections announced, {self.expected_connections} before"
        if hello.connection in self._links or (hello.control and self._control is not None):
            return f"connection {hello.connection} is already open"
        return None

    async def _run(
        self, sock: trio.socket.SocketType, hello: wire.Hello, relay: Relay | None = None
    ) -> None:
        connections = self.expected_connections
        assert connections is not None
        link = _make_link(sock, hello.connection, connections, relay)
        link.budget = self.budget
        if isinstance(link, _ControlLink):
            self._control = link
        else:
            self._links[link.index] = link
            for receiver in self.receivers.values():
                if receiver._sink is not None and self._open_link_of(receiver.index) is link:
                    link.attach_sink(receiver.index, receiver._sink, [])
        if len(self._links) == connections and self._control is not None:
            self._connected.set()
        validator = wire.InboundValidator(
            wire.Role.DESTINATION, self.devices, link.index, connections
        )
        await self._serve_link(link, validator)

    def _deliver_device_event(self, event: wire.Event, pool: _BufferPool) -> None:
        assert isinstance(event, wire.Data | wire.End)
        receiver = self.receivers[self.devices[event.device]]
        if isinstance(event, wire.Data):
            now = trio.current_time()
            if self._first_data_at is None:
                self._first_data_at = now
            self._payload_bytes += event.nbytes
            self._busy_s = now - self._first_data_at
            items: list[_Item] = [(piece, pool) for piece in event.pieces]
        else:
            items = [None]
        try:
            for item in items:
                receiver._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            _give_back(event, pool)
            if self.failure is None:
                self._fail(PeerError(f"device {receiver.name!r}'s stream was closed here"))

    def _wake_all(self) -> None:
        self._connected.set()
        for receiver in self.receivers.values():
            receiver._send.close()
            if receiver._sink is not None and self.failure is not None:
                receiver._sink.fail(self.failure)

    def _link_eof(self, link: _Link | _ControlLink, validator: wire.InboundValidator) -> None:
        unfinished = validator.open_devices
        if unfinished:
            self._fail(
                PeerError(
                    f"stream cut: the source closed connection {link.index} before the end "
                    f"of {', '.join(unfinished)}"
                )
            )
        elif validator.control:
            self._control_send.close()

    async def acknowledge(self, device: str, loaded: int | None = None) -> None:
        """Tell the source this device's initial data is loaded (the switchover-ack):
        ``loaded`` bytes of its stream (unset: every byte handed over so far)."""
        index = self.device_index(device)
        link = self._link_of(index)
        if loaded is None:
            loaded = self.receivers[device].loaded_bytes
        await link.write_frame(lambda encoder: _split(encoder.ack(index, loaded)))

    async def aclose(self) -> None:
        self._listener.forget(self.migration_id)
        await super().aclose()
