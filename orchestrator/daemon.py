"""``orchestrator serve``: the HTTP server and the migration service in one trio nursery.

Start-up, in this order, so that nothing is half-started when a check fails:

1. the settings' host checks: the token file (present, not empty, owner-only)
   and the TLS certificate and key (readable, a matching pair);
2. two lock files, taken with ``flock`` and holding the daemon's pid: one in
   the state directory (one daemon per journal) and one beside the Unix
   socket (one daemon per socket).  The kernel drops them if the process
   dies, so a crash never leaves a stale lock; a socket file left by a
   crash is removed once the lock is ours;
3. the journal (``Journal.open(state_dir)``), a fresh ``CollectorRegistry``
   with the ``Metrics``, the ``MigrationService`` and the API over it;
4. the listening sockets, bound here rather than by hypercorn: the Unix
   socket is made mode 0600 before ``listen``, so no one can connect while
   it is still open to others; so is the handover socket, where VMMs hand
   over their devices (``orchestrator.handover``), when the settings name one
   (with its own lock file);
5. the HTTP server (hypercorn's trio worker) and the handover server with
   ``nursery.start``: the first answers /healthz, and /readyz says 503, while
6. the service recovers what the journal holds unfinished
   (``nursery.start(service.run)``); /readyz says 200 once it has.

SIGHUP reloads the TLS certificates in place (``certificates``): new
connections present the rotated files; a rotation that does not load is
logged and changes nothing.

Shutdown, on SIGTERM or SIGINT (or ``shutdown_trigger`` in tests): new
migrations are refused with 503, running ones get ``shutdown_grace_s`` to
finish and the rest are rolled back (``service.shutdown``), then the HTTP
server stops (its own grace lets answers in flight go out), the service's
tasks end, the socket file and the locks are removed.  ``serve`` then
returns and ``orchestrator serve`` exits 0.  Signals that arrive during the
shutdown are logged and otherwise ignored: a rollback must not be cut short.

A listener (the HTTP server, the data-channel listener, the handover
server) that ends while the daemon is not stopping, which its own loop
never does for a client's sake (a shortage of descriptors, a stranger's
bytes), starts the same shutdown; ``serve`` then raises DaemonError naming
it, and ``orchestrator serve`` exits 5 (unavailable), for systemd to restart a daemon
that would otherwise live on deaf.  One that cannot start at all is a
DaemonError at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import secrets
import signal
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, cast

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework
from prometheus_client import CollectorRegistry, Gauge

from orchestrator import sdnotify
from orchestrator.api import create_app
from orchestrator.api.app import OrchestratorAPI
from orchestrator.backends import backends_for
from orchestrator.certificates import CertificateFiles, Certificates, expiry_timestamp
from orchestrator.errors import OrchestratorError, Problem
from orchestrator.handover import HandleRegistry, HandoverServer
from orchestrator.journal import Journal
from orchestrator.metrics import Metrics
from orchestrator.service import MigrationService
from orchestrator.settings import (
    UNIX_PATH_MAX,
    Settings,
    SettingsError,
    is_loopback,
    read_token_file,
)
from orchestrator.transport.channel import ChannelListener, TlsIdentity

log = structlog.get_logger("orchestrator.daemon")

#: How long the HTTP server lets answers in flight finish once it is told to stop.
HTTP_GRACE_S: Final = 5.0
BACKLOG: Final = 128
STATE_LOCK: Final = "daemon.lock"


class DaemonError(OrchestratorError):
    """The daemon cannot start: its socket or state directory is taken, a port is in use."""


@dataclass(frozen=True)
class Running:
    """What ``await nursery.start(serve, settings)`` hands back once the daemon is ready."""

    service: MigrationService
    socket_path: Path
    #: The bound TCP address (the real port when the settings said 0), if any.
    tcp_address: tuple[str, int] | None
    #: The server's own view: "http://unix:/...", "https://127.0.0.1:8443".
    urls: tuple[str, ...]
    #: Where VMMs hand over devices, if the settings name a handover socket.
    handover_socket: Path | None = None


# -- start-up checks -------------------------------------------------------------


#: The settings fields of each certificate the API may serve (its errors name them).
_API_CERTIFICATE_FIELDS = {
    "api": ("api.tls_cert", "api.tls_key"),
    "host": ("tls.cert_file", "tls.key_file"),
}


def api_certificate(settings: Settings) -> CertificateFiles | None:
    """The TCP API's certificate: ``[api] tls_cert``/``tls_key`` (``api``), else the
    host's ``[tls]`` identity (``host``), with the API on TCP."""
    api = settings.api
    if api.tls_cert is not None and api.tls_key is not None:
        return CertificateFiles("api", api.tls_cert, api.tls_key)
    if settings.tls is not None and api.tcp is not None:
        return CertificateFiles("host", settings.tls.cert_file, settings.tls.key_file)
    return None


def check_tls(settings: Settings) -> ssl.SSLContext | None:
    """Load the API's certificate and key now, so that a bad pair stops the start
    with a clear error."""
    files = api_certificate(settings)
    if files is None:
        return None
    cert, key = files.cert_file, files.key_file
    field, key_field = _API_CERTIFICATE_FIELDS[files.name]
    _readable((field, cert), (key_field, key))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise SettingsError(
            [Problem(field, f"cannot use {cert} with the key {key}: {exc.reason or exc}")]
        ) from None
    return context


def load_identity(settings: Settings) -> TlsIdentity | None:
    """The host's ``[tls]`` identity, its files read and both contexts built now, so
    that a bad one stops the start with a clear error naming the field."""
    tls = settings.tls
    if tls is None:
        return None
    _readable(
        ("tls.cert_file", tls.cert_file),
        ("tls.key_file", tls.key_file),
        ("tls.ca_file", tls.ca_file),
    )
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as exc:
        raise SettingsError(
            [
                Problem(
                    "tls.cert_file",
                    f"cannot use {tls.cert_file} with the key {tls.key_file}: {exc.reason or exc}",
                )
            ]
        ) from None
    try:
        probe.load_verify_locations(cafile=tls.ca_file)
    except ssl.SSLError as exc:
        raise SettingsError(
            [Problem("tls.ca_file", f"no CA certificate in {tls.ca_file}: {exc.reason or exc}")]
        ) from None
    expiry = expiry_timestamp(tls.cert_file)
    if expiry is not None and expiry < time.time():
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expiry))
        raise SettingsError(
            [Problem("tls.cert_file", f"{tls.cert_file} expired on {when}: every peer refuses it")]
        )
    return TlsIdentity(tls.cert_file, tls.key_file, tls.ca_file)


def _readable(*files: tuple[str, Path]) -> None:
    for field, path in files:
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise SettingsError([Problem(field, f"cannot read {path}: {exc.strerror}")]) from None


def check_socket_path(path: Path, field: str = "api.unix_socket") -> None:
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise SettingsError(
            [
                Problem(
                    field,
                    f"{path} is {len(os.fsencode(path))} bytes long; a Unix socket path "
                    f"holds at most {UNIX_PATH_MAX}",
                )
            ]
        )


# -- locks and sockets -------------------------------------------------------------


@contextlib.contextmanager
def pid_lock(path: Path, holder_of: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (with our pid in it) for the block.

    ``holder_of`` completes "another orchestrator daemon ... is serving on"
    style messages.  The file is removed on exit while still locked, so the
    next daemon never takes a lock on a file that is already unlinked: it
    checks, after locking, that the name still leads to the file it locked.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            # A read-only file system or directory: said in one line, not a traceback.
            raise DaemonError(
                f"cannot create the lock {path}: {exc.strerror or exc} (the daemon needs "
                f"to write in {path.parent}: is it read-only, or not this user's?)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise DaemonError(
                f"another orchestrator daemon{pid} {holder_of}: it holds the lock {path}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed it as we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def bind_unix_socket(
    path: Path, kind: int = socket.SOCK_STREAM, field: str = "api.unix_socket"
) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600.  Call with the socket's lock held.

    ``kind`` is its type (``SOCK_SEQPACKET`` for the handover socket);
    ``field`` the setting that names it, for errors.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise SettingsError(
                [Problem(field, f"{path} exists and is not a socket: not removing it")]
            )
        # We hold its lock, so it is a socket a dead daemon left behind.
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.bind(os.fspath(path))
        # Before listen(): until then a connect is refused, whatever the mode.
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot listen on the Unix socket {path}: {exc.strerror}") from None
    return sock


def bind_tcp_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SettingsError([Problem("api.tcp", f"cannot resolve {host!r}: {exc}")]) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot listen on TCP {host}:{port}: {exc.strerror}") from None
    return sock


@contextlib.contextmanager
def _removed_on_exit(path: Path) -> Iterator[None]:
    """Remove the socket file we created at ``path`` when the block ends (hypercorn leaves it)."""
    created = os.lstat(path).st_ino
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_ino == created:
                os.unlink(path)


# -- hypercorn -----------------------------------------------------------------------


class _ToStructlog(logging.Handler):
    """Hypercorn logs through stdlib logging; send its records on to our structlog output."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger("orchestrator.http").log(record.levelno, record.getMessage())


def _http_logger() -> logging.Logger:
    logger = logging.getLogger("orchestrator.http")
    logger.handlers = [_ToStructlog()]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)  # structlog filters by the configured level
    return logger


class _ServedConfig(HypercornConfig):
    """Hypercorn's settings, whose TLS context the daemon keeps (SIGHUP reloads it)."""

    certificates: Certificates | None = None
    #: The certificate it serves (certfile and keyfile), once TLS is on.
    served: CertificateFiles | None = None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        context = super().create_ssl_context()
        if context is not None and self.certificates is not None:
            assert self.served is not None
            self.certificates.keep(self.served, context)
        return context


def _hypercorn_config(
    settings: Settings,
    sockets: list[socket.socket],
    tls: bool,
    certificates: Certificates | None = None,
) -> HypercornConfig:
    """Serve the sockets we bound (as ``fd://``); the TCP one with TLS when configured."""
    config = _ServedConfig()
    config.certificates = certificates
    binds = [f"fd://{sock.detach()}" for sock in sockets]
    served = api_certificate(settings) if tls else None
    if served is not None:
        config.served = served
        config.certfile = os.fspath(served.cert_file)
        config.keyfile = os.fspath(served.key_file)
        # The Unix socket (first) stays plain: its file mode is its protection.
        config.insecure_bind = binds[:1]
        config.bind = binds[1:]
    else:
        config.bind = binds
    config.graceful_timeout = HTTP_GRACE_S
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = _http_logger()
    return config


# -- the daemon ------------------------------------------------------------------------


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``shutdown_trigger`` returns), then stop it
    gracefully; see the module docstring.  Raises SettingsError or DaemonError when it
    cannot start."""
    with contextlib.ExitStack() as stack:
        # First of all, so that a signal during start-up is a graceful stop too.
        signals = None
        if shutdown_trigger is None:
            signals = stack.enter_context(
                trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            )
        tokens = read_token_file(settings.api.token_file)
        read_tokens = _role_tokens(settings.api.read_token_file, "api.read_token_file")
        peer_tokens = _role_tokens(settings.api.peer_token_file, "api.peer_token_file")
        settings.check_cleartext()
        tls = check_tls(settings) is not None
        identity = load_identity(settings)
        socket_path = settings.socket_path
        check_socket_path(socket_path)
        _make_dir(settings.state_dir, "state_dir")
        _make_dir(socket_path.parent, "api.unix_socket")
        stack.enter_context(
            pid_lock(
                settings.state_dir / STATE_LOCK,
                f"uses the state directory {settings.state_dir}",
            )
        )
        stack.enter_context(
            pid_lock(
                socket_path.with_name(socket_path.name + ".lock"),
                f"is serving on {socket_path}",
            )
        )
        handover_path = settings.handover_socket
        if handover_path is not None:
            check_socket_path(handover_path, "handover_socket")
            _make_dir(handover_path.parent, "handover_socket")
            stack.enter_context(
                pid_lock(
                    handover_path.with_name(handover_path.name + ".lock"),
                    f"takes device handovers on {handover_path}",
                )
            )
        journal = await Journal.open(settings.state_dir)
        async with journal:
            registry = CollectorRegistry()
            certificates = Certificates(registry)
            listener = (
                ChannelListener(
                    max_handshakes=settings.data.max_handshakes,
                    max_buffered_bytes=settings.data.max_buffered_mib << 20,
                    tls=(
                        certificates.keep(
                            CertificateFiles(
                                "host", identity.cert_file, identity.key_file, identity.ca_file
                            ),
                            identity.server_context(),
                        )
                        if identity is not None
                        else None
                    ),
                )
                if settings.data.listen is not None
                else None
            )
            if listener is not None:
                Gauge(
                    "orchestrator_channel_buffered_bytes",
                    "Device state received from other hosts and not yet loaded into the "
                    "devices, over every incoming migration ([data] max_buffered_mib caps "
                    "each).",
                    registry=registry,
                ).set_function(listener.buffered_bytes)
            handles = HandleRegistry()
            # Whatever ends the daemon, the descriptors VMMs lent it are closed.
            stack.callback(handles.close_all)
            service = MigrationService(
                journal,
                # The node, as the deployment names it (the DaemonSet's downward
                # API), so that dashboards can filter by it.
                Metrics(registry, node=os.environ.get("NODE_NAME") or socket.gethostname()),
                # One registry: plans' handles are checked against it and the
                # backends open handed-over devices from it.
                backends=backends_for(settings.state_dir, handles=handles),
                handles=handles,
                listener=listener,
                advertise=settings.data.advertise,
                tls=identity,
                decision_key=_decision_key(settings.state_dir),
                max_migrations=settings.max_migrations,
                retention_days=settings.journal_retention_days,
                compat=settings.compat,
            )
            app = create_app(
                service,
                registry=registry,
                tokens=tokens,
                read_tokens=read_tokens,
                peer_tokens=peer_tokens,
                max_body_bytes=settings.api.max_body_bytes,
            )
            sockets = [bind_unix_socket(socket_path)]
            stack.enter_context(_removed_on_exit(socket_path))
            tcp_address = None
            if settings.api.tcp_address is not None:
                host, port = settings.api.tcp_address
                if not tls and not is_loopback(host):
                    log.warning(
                        "daemon.tcp_without_tls",
                        tcp=settings.api.tcp,
                        hint="bearer tokens cross the network in clear: set [tls] (or "
                        "api.tls_cert and api.tls_key)",
                    )
                try:
                    tcp_socket = bind_tcp_socket(host, port)
                except BaseException:
                    sockets[0].close()
                    raise
                tcp_address = tcp_socket.getsockname()[:2]
                sockets.append(tcp_socket)
            service.source_api = source_api_url(settings, tcp_address, tls)
            handover = None
            if handover_path is not None:
                try:
                    handover = bind_unix_socket(
                        handover_path, socket.SOCK_SEQPACKET, "handover_socket"
                    )
                except BaseException:
                    for sock in sockets:
                        sock.close()
                    raise
                stack.enter_context(_removed_on_exit(handover_path))
            config = _hypercorn_config(settings, sockets, tls, certificates)
            await _run(
                settings,
                service,
                app,
                config,
                signals,
                shutdown_trigger,
                task_status,
                socket_path,
                tcp_address,
                handover,
                certificates,
            )


def source_api_url(
    settings: Settings, tcp_address: tuple[str, int] | None, tls: bool
) -> str | None:
    """The URL other hosts' daemons reach this API on: ``[api] advertise``, else the
    TCP listener's own address where it is one (not a wildcard); None without either."""
    if settings.api.advertise is not None:
        return settings.api.advertise.rstrip("/")
    if tcp_address is None:
        return None
    host, port = tcp_address
    if host in ("0.0.0.0", "::", ""):
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def _decision_key(state_dir: Path) -> bytes:
    """The key every migration's decision credential is derived from: made once,
    kept in the state directory (mode 0600) so that it answers after a restart."""
    path = state_dir / "decision.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
        raise SettingsError(
            [Problem("state_dir", f"{path} is shorter than 32 bytes: remove it to make a new one")]
        ) from None
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    return key


async def _run(
    settings: Settings,
    service: MigrationService,
    app: OrchestratorAPI,
    config: HypercornConfig,
    signals: AsyncIterator[int] | None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None,
    task_status: trio.TaskStatus[Running],
    socket_path: Path,
    tcp_address: tuple[str, int] | None,
    handover: socket.socket | None = None,
    certificates: Certificates | None = None,
) -> None:
    stop = trio.Event()
    stop_http = trio.Event()
    http_stopped = trio.Event()
    #: Why a listener ended while the daemon was not stopping.
    failures: list[str] = []

    async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            # Starlette's ASGI types and hypercorn's describe the same protocol.
            asgi_app = cast(ASGIFramework, app)
            await hypercorn_serve(
                asgi_app, config, shutdown_trigger=stop_http.wait, task_status=task_status
            )
        finally:
            http_stopped.set()

    async with trio.open_nursery() as nursery:
        if signals is not None:
            nursery.start_soon(_stop_on_signal, signals, stop, certificates)
        else:
            assert shutdown_trigger is not None
            nursery.start_soon(_stop_when, shutdown_trigger, stop)
        urls = await nursery.start(_listen, "API server", run_http, stop, failures)
        if service.incoming.listener is not None:
            data_address = settings.data.listen_address
            assert data_address is not None
            host, port = data_address
            await nursery.start(
                _listen,
                f"data-channel listener on {host}:{port}",
                partial(service.incoming.listener.serve, host, port),
                stop,
                failures,
            )
        if handover is not None:
            assert service.handles is not None
            await nursery.start(
                _listen,
                "handover server",
                partial(HandoverServer(service.handles).serve, handover),
                stop,
                failures,
            )
        await nursery.start(service.run)
        # What exists now (modules, the app, its schemas: some 80,000 objects)
        # lives as long as the daemon.  Out of the collector's sight, a full
        # collection no longer walks it: about 50 ms here, long enough to land
        # in a switchover's downtime window and double it.
        gc.collect()
        gc.freeze()
        log.info(
            "daemon.ready",
            urls=urls,
            state_dir=str(settings.state_dir),
            pid=os.getpid(),
        )
        sdnotify.notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS=serving {' '.join(urls)}")
        task_status.started(
            Running(
                service=service,
                socket_path=socket_path,
                tcp_address=tcp_address,
                urls=tuple(urls),
                handover_socket=settings.handover_socket,
            )
        )
        await stop.wait()
        log.info("daemon.stopping", grace_s=settings.shutdown_grace_s)
        sdnotify.notify("STOPPING=1", "STATUS=stopping: migrations under way end or roll back")
        await service.shutdown(settings.shutdown_grace_s)
        stop_http.set()
        await http_stopped.wait()
        nursery.cancel_scope.cancel()
    if failures:
        log.error("daemon.stopped", failures=failures)
        raise DaemonError("; ".join(failures))
    log.info("daemon.stopped")


def _describe(exc: BaseException) -> str:
    """What went wrong, in words: an OSError's own, each of a group's."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class _StartedFlag:
    """A ``task_status`` that remembers whether its task said it had started."""

    def __init__(self, status: trio.TaskStatus[Any]) -> None:
        self._status = status
        self.did_start = False

    def started(self, value: Any = None) -> None:
        self.did_start = True
        self._status.started(value)


async def _listen(
    name: str,
    serve: Callable[..., Awaitable[object]],
    stop: trio.Event,
    failures: list[str],
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a listener, ``serve(task_status=...)``, for as long as the daemon runs.

    One that cannot start is a DaemonError naming it.  One that ends while
    the daemon is not stopping (an error its own loop did not expect) must
    not leave a daemon that looks alive and hears nothing: its reason joins
    ``failures`` and the daemon stops as on SIGTERM (running migrations get
    their grace, then roll back), then exits non-zero, for systemd to
    restart it.
    """
    status = _StartedFlag(task_status)
    try:
        await serve(task_status=status)
    except Exception as exc:
        detail = _describe(exc)
        if not status.did_start:
            raise DaemonError(f"cannot start the {name}: {detail}") from exc
        log.exception("daemon.listener_failed", listener=name, error=detail)
        failures.append(f"the {name} failed: {detail}")
    else:
        if stop.is_set():
            return
        log.error("daemon.listener_failed", listener=name, error="it stopped by itself")
        failures.append(f"the {name} stopped by itself")
    stop.set()


async def _stop_on_signal(
    signals: AsyncIterator[int], stop: trio.Event, certificates: Certificates | None = None
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("daemon.signal", signal=name, action="reload the TLS certificates")
            if certificates is not None:
                certificates.reload()
            continue
        if stop.is_set():
            log.warning("daemon.signal_ignored", signal=name, reason="already shutting down")
        else:
            log.info("daemon.signal", signal=name)
            stop.set()


async def _stop_when(trigger: Callable[[], Awaitable[object]], stop: trio.Event) -> None:
    await trigger()
    stop.set()


def _make_dir(path: Path, field: str) -> None:
    try:
        if not path.is_dir():
            path.mkdir(mode=0o700, parents=True)
    except OSError as exc:
        raise SettingsError([Problem(field, f"cannot create {path}: {exc.strerror}")]) from None


def _role_tokens(path: Path | None, field: str) -> tuple[str, ...]:
    """The tokens of an optional role's file (none without one)."""
    return () if path is None else read_token_file(path, field=field)
