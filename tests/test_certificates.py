"""The daemon's certificates: reloaded in place on SIGHUP, their expiry exported."""

from __future__ import annotations

import contextlib
import datetime
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme
from prometheus_client import CollectorRegistry

from orchestrator import daemon
from orchestrator.certificates import CertificateFiles, Certificates, expiry_timestamp
from orchestrator.transport.channel import TlsIdentity
from tests.helpers import tls_identity


def write_identity(ca: trustme.CA, folder: Path, days: int) -> TlsIdentity:
    now = datetime.datetime.now(datetime.UTC)
    return tls_identity(ca, folder, "127.0.0.1", not_after=now + datetime.timedelta(days=days))


def served_expiry(server: ssl.SSLContext, client_ctx: ssl.SSLContext) -> float:
    """A handshake in memory against ``server``: when the certificate it presents expires."""
    a_in, a_out, b_in, b_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(a_in, a_out, server_hostname="127.0.0.1")
    peer = server.wrap_bio(b_in, b_out, server_side=True)
    for _ in range(10):
        for side in (client, peer):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        b_in.write(a_out.read())
        a_in.write(b_out.read())
    cert = client.getpeercert()
    assert cert is not None
    return float(ssl.cert_time_to_seconds(str(cert["notAfter"])))


def gauge(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(
        "orchestrator_tls_certificate_expiry_timestamp_seconds", {"certificate": name}
    )


def test_a_reload_serves_the_rotated_certificate_and_exports_its_expiry(tmp_path: Path) -> None:
    ca = trustme.CA()
    old = write_identity(ca, tmp_path / "id", days=10)
    registry = CollectorRegistry()
    certs = Certificates(registry)
    files = CertificateFiles("host", old.cert_file, old.key_file, old.ca_file)
    server = certs.keep(files, old.server_context())
    client = old.client_context()
    before = served_expiry(server, client)
    assert gauge(registry, "host") == pytest.approx(before)
    assert expiry_timestamp(old.cert_file) == pytest.approx(before)
    # The files are rotated (same paths, a certificate good for a year), then SIGHUP.
    write_identity(ca, tmp_path / "id", days=365)
    assert certs.reload() == []
    after = served_expiry(server, client)
    assert after - before > 300 * 86400
    assert gauge(registry, "host") == pytest.approx(after)


def test_a_bad_rotation_keeps_the_certificate_in_use(tmp_path: Path) -> None:
    ca = trustme.CA()
    ident = write_identity(ca, tmp_path / "id", days=30)
    registry = CollectorRegistry()
    certs = Certificates(registry)
    server = certs.keep(
        CertificateFiles("api", ident.cert_file, ident.key_file), ident.server_context()
    )
    client = ident.client_context()
    before = served_expiry(server, client)
    ident.cert_file.write_text("half-written\n")
    assert certs.reload() == ["api"]
    assert served_expiry(server, client) == before
    assert gauge(registry, "api") == pytest.approx(before)


async def test_sighup_reloads_and_does_not_stop_the_daemon() -> None:
    reloads: list[int] = []

    class Counting(Certificates):
        def reload(self) -> list[str]:
            reloads.append(1)
            return []

    send, receive = trio.open_memory_channel[int](4)

    async def signals() -> AsyncIterator[int]:
        async for signum in receive:
            yield signum

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon._stop_on_signal, signals(), stop, Counting())
        await send.send(signal.SIGHUP)
        await send.send(signal.SIGHUP)
        await trio.testing.wait_all_tasks_blocked()
        assert reloads == [1, 1] and not stop.is_set()
        await send.send(signal.SIGTERM)
        await stop.wait()
        nursery.cancel_scope.cancel()
