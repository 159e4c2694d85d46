"""Mutual TLS under a data-channel connection, and the contexts it is made from.

With a ``[tls]`` identity both daemons wrap every data-channel connection in
TLS before anything else crosses it: the destination presents its
certificate and requires one signed by the same CA from the source, and
the source checks the destination's certificate against the name in the
destination's URL.  The channel's own handshake (challenge, HELLO, WELCOME:
which migration, proven by its secret) then runs inside the TLS session.

:func:`secure` does the TLS handshake on the connected TCP socket and puts a
relay between it and the channel: the channel gets one end of a socket pair,
exactly as it would a plain TCP socket (its framing, its threads and its
non-blocking control reads do not change), and two relay threads move the
bytes between the other end and the TLS session:

* *up*: what the channel writes, encrypted, onto the TCP socket; the end of
  what it writes becomes TLS's ``close_notify`` and a half-close;
* *down*: what arrives on the TCP socket, decrypted, to the channel; the
  peer's ``close_notify`` becomes an end of stream, and anything else that
  ends the TCP stream (a cut, a bad record) closes the pair, which the
  channel sees as its connection cut.

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
import socket as stdlib_socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import trio

from orchestrator.errors import PeerError

__all__ = ["TlsIdentity", "TlsPeer", "secure"]

#: The most bytes a relay thread moves in one step.
RELAY_BYTES = 256 << 10
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


async def secure(
    sock: trio.socket.SocketType,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    limiter: trio.CapacityLimiter | None = None,
) -> trio.socket.SocketType:
    """Do the TLS handshake on the connected ``sock`` (which this takes over) and
    return the channel's end of the relay to it.  PeerError says why it failed.

    The handshake runs in a worker thread.  A cancelled one (a deadline, an
    eviction) is abandoned: its socket is shut down, which ends it, and the
    thread closes the socket as it ends (never under a call still running)."""
    raw = stdlib_socket.socket(fileno=sock.detach())
    raw.setblocking(True)
    session = _Session(ctx, server_side=server_hostname is None, server_hostname=server_hostname)
    handshake = _Handshake(session, raw)
    try:
        await trio.to_thread.run_sync(handshake.run, abandon_on_cancel=True, limiter=limiter)
    except trio.Cancelled:
        handshake.abandon()
        raise
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise PeerError(f"the TLS handshake failed: {_reason(exc)}") from None
    ours, theirs = stdlib_socket.socketpair()
    _Relay(session, raw, theirs).start()
    ours.setblocking(False)
    return trio.socket.from_stdlib_socket(ours)


class _Handshake:
    """A handshake in a worker thread, and who closes its socket if trio leaves it."""

    def __init__(self, session: _Session, raw: stdlib_socket.socket) -> None:
        self.session = session
        self.raw = raw
        self._lock = threading.Lock()
        self._abandoned = False
        self._ended = False

    def run(self) -> None:
        try:
            self.session.handshake(self.raw)
        finally:
            with self._lock:
                self._ended = True
                if self._abandoned:
                    self.raw.close()

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if self._ended:
                self.raw.close()
                return
            # Under the lock: the thread cannot close the socket (and its number
            # be reused) while it is shut down here.
            with contextlib.suppress(OSError):
                self.raw.shutdown(stdlib_socket.SHUT_RDWR)


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

    def handshake(self, raw: stdlib_socket.socket) -> None:
        """The TLS handshake, on a blocking socket (before any relay runs)."""
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                wanted = True
            else:
                wanted = False
            self._flush(raw)
            if not wanted:
                return
            data = raw.recv(RELAY_BYTES)
            if not data:
                raise ConnectionResetError("the peer closed the connection in the handshake")
            self.incoming.write(data)

    def _flush(self, raw: stdlib_socket.socket) -> None:
        pending = self.outgoing.read()
        if pending:
            raw.sendall(pending)

    # -- the relay's two directions --

    def send(self, raw: stdlib_socket.socket, plain: bytes | memoryview) -> None:
        with self.send_lock:
            with self.lock:
                self.tls.write(plain)
                cipher = self.outgoing.read()
            raw.sendall(cipher)

    def close_notify(self, raw: stdlib_socket.socket) -> None:
        with self.send_lock:
            with self.lock:
                with contextlib.suppress(ssl.SSLError):
                    self.tls.unwrap()
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
        if not self.outgoing.pending:
            return
        with self.send_lock:
            with self.lock:
                cipher_out = self.outgoing.read()
            if cipher_out:
                raw.sendall(cipher_out)


class _Relay:
    """The two threads between the channel's socket pair and the TLS session."""

    def __init__(
        self, session: _Session, raw: stdlib_socket.socket, pair: stdlib_socket.socket
    ) -> None:
        self.session = session
        self.raw = raw
        self.pair = pair
        self._left = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._up, name="tls-up", daemon=True).start()
        threading.Thread(target=self._down, name="tls-down", daemon=True).start()

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
                    return
                session.send(raw, plain[:n])
        except (OSError, ssl.SSLError):
            self._cut()
        finally:
            self._done()

    def _down(self) -> None:
        raw, pair, session = self.raw, self.pair, self.session
        cipher, plain = memoryview(bytearray(RELAY_BYTES)), memoryview(bytearray(RELAY_BYTES))
        try:
            while True:
                got = raw.recv_into(cipher)
                if not got:
                    # The TCP stream ended without close_notify: a cut, or a truncation.
                    self._cut()
                    return
                session.receive(cipher[:got])
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
        except (OSError, ssl.SSLError):
            self._cut()
        finally:
            self._done()

    def _cut(self) -> None:
        """The TLS side failed: the channel's connection is cut both ways."""
        for sock in (self.pair, self.raw):
            with contextlib.suppress(OSError):
                sock.shutdown(stdlib_socket.SHUT_RDWR)

    def _done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left:
                return
        self.pair.close()
        self.raw.close()
