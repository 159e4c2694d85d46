"""Mutual TLS under a data-channel connection, and the contexts it is made from.

With a ``[tls]`` identity both daemons wrap every data-channel connection in
TLS before anything else crosses it: the destination presents its
certificate and requires one signed by the same CA from the source, and
the source checks the destination's certificate against the name in the
destination's URL.  The channel's own handshake (challenge, HELLO, WELCOME:
which migration, proven by its secret) then runs inside the TLS session.

:func:`secure` does the TLS handshake on the connected TCP socket, in trio
(no worker thread a stranger could hold; a deadline or an eviction cancels
it), and puts a relay between it and the channel: the channel gets one end
of a socket pair,
exactly as it would a plain TCP socket (its framing, its threads and its
non-blocking control reads do not change), and two relay threads move the
bytes between the other end and the TLS session:

* *up*: what the channel writes, encrypted, onto the TCP socket; the end of
  what it writes becomes TLS's ``close_notify`` and a half-close;
* *down*: what arrives on the TCP socket, decrypted, to the channel; the
  peer's ``close_notify`` becomes an end of stream, and anything else that
  ends the TCP stream (a cut, a truncation, a bad record) ends the pair
  too, with ``Relay.failure`` saying why: the channel's connection asks it
  when its socket ends, and fails with that reason.  Once the channel
  closed its end, the peer has ``LINGER_S`` to end its own before the relay
  cuts it: no thread is left waiting on a peer that never closes.

What the relay holds, and what the TCP socket has not yet delivered, count
in the connection's in-flight bytes (``Relay.in_flight_bytes``).

The TLS session is an ``ssl.SSLObject`` over memory BIOs, which the relay
threads use under one lock (OpenSSL's objects are not for two threads at
once); the socket I/O itself runs outside it, each thread on its own
direction.  Records go out in the order they were made: whoever makes one
holds the send lock until it is on the wire.  The threads release the GIL
in the socket calls and in OpenSSL's cipher work.

Python's ``ssl`` has no kernel TLS offload here: this is user-space TLS,
and bench/stream_throughput.py prints what it costs.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket as stdlib_socket
import ssl
import sys
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from orchestrator.errors import PeerError

__all__ = ["Relay", "Secured", "TlsIdentity", "TlsPeer", "TlsRefused", "secure"]

#: The most bytes a relay thread moves in one step.
RELAY_BYTES = 256 << 10
#: How long, after the channel closed its end, the peer has to end its own.
LINGER_S = 30.0
#: The oldest protocol either side accepts (1.3 preferred, as OpenSSL negotiates it).
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class TlsIdentity:
    """This host's identity for migration traffic: its certificate and key, and the
    CA that signs every host's (``[tls]`` in the settings)."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    def server_context(self) -> ssl.SSLContext:
        """For the data listener: present this host's certificate, require the peer's."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._load(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For the source: present this host's certificate, check the destination's
        (and its name)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._load(ctx)
        return ctx

    def _load(self, ctx: ssl.SSLContext) -> None:
        ctx.minimum_version = MINIMUM_VERSION
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.load_verify_locations(cafile=self.ca_file)


@dataclass(frozen=True)
class TlsPeer:
    """How the source reaches a destination over TLS: its context, and the name the
    destination's certificate must carry (from the destination's URL)."""

    context: ssl.SSLContext
    hostname: str


class TlsRefused(PeerError):
    """The TLS handshake failed on TLS's own terms: no TLS (cleartext), a certificate
    not the CA's, expired, or of another name, a protocol version refused."""


@dataclass(frozen=True)
class Secured:
    """A connection after its TLS handshake: the channel's end of the relay, and the
    relay (what it holds in flight, and why it ended, if it was cut)."""

    sock: trio.socket.SocketType
    relay: Relay


async def secure(
    sock: trio.socket.SocketType,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
) -> Secured:
    """Do the TLS handshake on the connected ``sock``, then put the relay behind it.

    The handshake runs in trio (a millisecond of cryptography in its thread;
    no worker thread a stranger could hold): a deadline or an eviction cancels
    it, and ``sock`` stays the caller's until it succeeded.  TlsRefused says
    why TLS refused the peer, PeerError that the peer went away."""
    session = _Session(ctx, server_side=server_hostname is None, server_hostname=server_hostname)
    try:
        await session.handshake(sock)
    except ssl.SSLError as exc:
        raise TlsRefused(f"the TLS handshake failed: {_reason(exc)}") from None
    except OSError as exc:
        raise PeerError(f"the TLS handshake failed: {_reason(exc)}") from None
    ours, theirs = stdlib_socket.socketpair()
    try:
        raw = stdlib_socket.socket(fileno=sock.detach())
    except BaseException:
        ours.close()
        theirs.close()
        raise
    raw.setblocking(True)
    relay = Relay(session, raw, theirs)
    relay.start()
    ours.setblocking(False)
    return Secured(trio.socket.from_stdlib_socket(ours), relay)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class _Session:
    """One TLS session over memory BIOs; see the module docstring."""

    def __init__(
        self, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        #: Held around every use of the SSL object.
        self.lock = threading.Lock()
        #: Held from making a record until it is on the wire.
        self.send_lock = threading.Lock()

    async def handshake(self, sock: trio.socket.SocketType) -> None:
        """The TLS handshake, on the trio socket (before any relay runs)."""
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                done = False
            else:
                done = True
            pending = self.outgoing.read()
            while pending:
                sent = await sock.send(pending)
                pending = pending[sent:]
            if done:
                return
            data = await sock.recv(RELAY_BYTES)
            if not data:
                raise ConnectionResetError("the peer closed the connection")
            self.incoming.write(data)

    # -- the relay's two directions --

    def send(self, raw: stdlib_socket.socket, plain: bytes | memoryview) -> None:
        self._emit(raw, lambda: self.tls.write(plain))

    def close_notify(self, raw: stdlib_socket.socket) -> None:
        def unwrap() -> None:
            with contextlib.suppress(ssl.SSLError):
                self.tls.unwrap()

        self._emit(raw, unwrap)

    def _emit(self, raw: stdlib_socket.socket, make: Callable[[], object]) -> None:
        """``make`` records (under the session's lock), then send them, the send
        lock held from making them until they are on the wire."""
        with self.send_lock:
            with self.lock:
                make()
                cipher = self.outgoing.read()
            if cipher:
                raw.sendall(cipher)

    def receive(self, cipher: memoryview) -> None:
        """Take what arrived off the wire (decrypted by ``read_into``)."""
        with self.lock:
            self.incoming.write(cipher)

    def read_into(self, out: memoryview) -> tuple[int, bool]:
        """Decrypt into ``out`` what the records taken so far hold, as far as it goes:
        the bytes written, and whether ``out`` filled (more may wait).  Raises
        ssl.SSLZeroReturnError once the peer ended the session (close_notify)."""
        n = 0
        with self.lock:
            while n < len(out):
                try:
                    # With a buffer, read returns the count (typeshed says bytes too).
                    got = int(self.tls.read(len(out) - n, out[n:]))
                except ssl.SSLWantReadError:
                    return n, False
                if not got:
                    raise ssl.SSLZeroReturnError("the peer ended the TLS session")
                n += got
        return n, True

    def answer(self, raw: stdlib_socket.socket) -> None:
        """A record the session answers with (TLS 1.3 post-handshake), in order with
        the up direction's records."""
        if self.outgoing.pending:
            self._emit(raw, lambda: None)


class Relay:
    """The two threads between the channel's socket pair and the TLS session.

    ``failure`` says why it ended, when it was not a clean end (a TCP stream
    that ended without ``close_notify``, a bad record, an error): the pair
    itself can only end, so the channel asks here when its socket does.
    """

    def __init__(
        self, session: _Session, raw: stdlib_socket.socket, pair: stdlib_socket.socket
    ) -> None:
        self.session = session
        self.raw = raw
        self.pair = pair
        self.failure: str | None = None
        self._left = 2
        self._lock = threading.Lock()
        self._closed = False
        #: Plaintext the up thread took from the pair and has not yet sent.
        self._in_hand = 0
        self._down_done = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._up, name="tls-up", daemon=True).start()
        threading.Thread(target=self._down, name="tls-down", daemon=True).start()

    def in_flight_bytes(self) -> int:
        """What the relay holds and the TCP socket has not delivered to the peer's
        kernel (beside what the pair itself holds, which the channel counts)."""
        with self._lock:
            if self._closed:
                return 0
            try:
                raw = fcntl.ioctl(self.raw.fileno(), termios.TIOCOUTQ, b"\0" * 4)
            except OSError:
                return self._in_hand
        return self._in_hand + int.from_bytes(raw, sys.byteorder, signed=True)

    def _up(self) -> None:
        raw, pair, session = self.raw, self.pair, self.session
        plain = memoryview(bytearray(RELAY_BYTES))
        try:
            while True:
                n = pair.recv_into(plain)
                if not n:
                    session.close_notify(raw)
                    with contextlib.suppress(OSError):
                        raw.shutdown(stdlib_socket.SHUT_WR)
                    # The channel closed its end: the peer has LINGER_S to end its
                    # side too, or the down thread is cut (never left blocked).
                    if not self._down_done.wait(LINGER_S):
                        self._cut("the peer did not end its side of the TLS session")
                    return
                self._in_hand = n
                session.send(raw, plain[:n])
                self._in_hand = 0
        except (OSError, ssl.SSLError) as exc:
            self._cut(f"TLS send failed: {_reason(exc)}")
        finally:
            self._done()

    def _down(self) -> None:
        raw, pair, session = self.raw, self.pair, self.session
        cipher, plain = memoryview(bytearray(RELAY_BYTES)), memoryview(bytearray(RELAY_BYTES))
        try:
            while True:
                # First what the session holds already (records that came with
                # the handshake's last flight), then what arrives.
                more = True
                while more:
                    try:
                        n, more = session.read_into(plain)
                    except ssl.SSLZeroReturnError:
                        with contextlib.suppress(OSError):
                            pair.shutdown(stdlib_socket.SHUT_WR)
                        return
                    if n:
                        pair.sendall(plain[:n])
                session.answer(raw)
                got = raw.recv_into(cipher)
                if not got:
                    self._cut("the TLS connection was cut (TCP ended without close_notify)")
                    return
                session.receive(cipher[:got])
        except (OSError, ssl.SSLError) as exc:
            self._cut(f"TLS receive failed: {_reason(exc)}")
        finally:
            self._down_done.set()
            self._done()

    def _cut(self, why: str) -> None:
        """The TLS side failed: the channel's connection is cut both ways."""
        if self.failure is None:
            self.failure = why
        for sock in (self.pair, self.raw):
            with contextlib.suppress(OSError):
                sock.shutdown(stdlib_socket.SHUT_RDWR)

    def _done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left:
                return
            self._closed = True
            self.pair.close()
            self.raw.close()
