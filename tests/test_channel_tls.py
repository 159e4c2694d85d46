"""Mutual TLS under the data channel (``transport.channel.tls``): certificates
made by a test CA (trustme), a listener that requires TLS, sources that
present a certificate or do not."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trustme

from orchestrator.errors import PeerError
from orchestrator.transport import ChannelListener, new_secret, open_channel
from orchestrator.transport.channel import Refusal, TlsIdentity, TlsPeer
from tests.channel_helpers import Address, closed_on_us, drain, pour, raw_connect
from tests.helpers import tls_identity


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def identity(ca: trustme.CA, tmp: Path, name: str, *hosts: str) -> TlsIdentity:
    """A host's identity: its certificate for ``hosts``, signed by ``ca``."""
    return tls_identity(ca, tmp / name, *hosts)


@contextlib.asynccontextmanager
async def tls_serving(ident: TlsIdentity) -> AsyncIterator[tuple[ChannelListener, Address]]:
    listener = ChannelListener(handshake_timeout_s=5.0, tls=ident.server_context())
    async with trio.open_nursery() as nursery:
        address = await nursery.start(listener.serve, "127.0.0.1")
        yield listener, address
        nursery.cancel_scope.cancel()


async def test_streams_and_control_cross_mutual_tls_byte_exact(
    ca: trustme.CA, tmp_path: Path
) -> None:
    server = identity(ca, tmp_path, "dst", "127.0.0.1", "dst.example")
    client = identity(ca, tmp_path, "src", "src.example")
    devices = ["gpu0", "gpu1", "nic0"]
    data = {"gpu0": os.urandom(9 << 20), "gpu1": os.urandom((4 << 20) + 3), "nic0": b""}
    secret = new_secret()
    peer = TlsPeer(client.client_context(), "127.0.0.1")
    async with tls_serving(server) as (listener, address):
        dest = listener.expect("mig-tls", secret, devices)
        got: dict[str, bytes] = {}

        async def load(device: str) -> None:
            got[device] = await drain(dest.receiver(device))
            await dest.acknowledge(device)

        async with open_channel(address, "mig-tls", secret, devices, tls=peer) as src:
            async with trio.open_nursery() as nursery:
                for device in devices:
                    nursery.start_soon(load, device)
                    nursery.start_soon(pour, src.sender(device), data[device], 1 << 20)
            await src.all_acknowledged()
            await src.send_control({"step": "commit"})
            assert await dest.receive_control() == {"step": "commit"}
            await dest.send_control({"ok": True})
            assert await src.receive_control() == {"ok": True}
        assert got == data
        await dest.aclose()


async def test_a_cleartext_source_is_refused(ca: trustme.CA, tmp_path: Path) -> None:
    server = identity(ca, tmp_path, "dst", "127.0.0.1")
    secret = new_secret()
    async with tls_serving(server) as (listener, address):
        listener.expect("mig-clear", secret, ["gpu0"])
        # A cleartext source waits for the challenge the listener never sends in
        # clear (it waits for a TLS hello): neither gets anywhere, and the
        # listener closes the connection at its handshake deadline.  (A daemon
        # learns from the prepare answer that TLS is required, before this.)
        listener.handshake_timeout_s = 0.3
        with pytest.raises(PeerError, match=r"closed the connection|did not accept the channel"):
            async with open_channel(address, "mig-clear", secret, ["gpu0"], connect_timeout_s=3):
                pass
        assert listener.statistics().refused.get(Refusal.TIMEOUT, 0) >= 1
        # Bytes that are no TLS hello are refused as such, at once.
        garbage = await raw_connect(address)
        async with garbage:
            await garbage.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(10):
                assert await closed_on_us(garbage)
        assert listener.statistics().refused.get(Refusal.TLS, 0) == 1


async def test_a_certificate_of_another_ca_is_refused_both_ways(
    ca: trustme.CA, tmp_path: Path
) -> None:
    server = identity(ca, tmp_path, "dst", "127.0.0.1")
    stranger = identity(trustme.CA(), tmp_path, "other", "src.example")
    secret = new_secret()
    async with tls_serving(server) as (listener, address):
        listener.expect("mig-ca", secret, ["gpu0"])
        # The source trusts only the other CA: it refuses the destination ...
        peer = TlsPeer(stranger.client_context(), "127.0.0.1")
        with pytest.raises(PeerError, match=r"TLS handshake failed: .*certificate"):
            async with open_channel(address, "mig-ca", secret, ["gpu0"], tls=peer):
                pass
        # ... and a source whose own certificate the destination's CA did not sign
        # is refused by the destination.
        mixed = stranger.client_context()
        mixed.load_verify_locations(cafile=server.ca_file)
        with pytest.raises(PeerError):
            async with open_channel(
                address, "mig-ca", secret, ["gpu0"], tls=TlsPeer(mixed, "127.0.0.1")
            ):
                pass
        assert listener.statistics().refused.get(Refusal.TLS, 0) >= 1


async def test_a_destination_under_another_name_is_refused(ca: trustme.CA, tmp_path: Path) -> None:
    server = identity(ca, tmp_path, "dst", "dst.example")  # no IP SAN for 127.0.0.1
    client = identity(ca, tmp_path, "src", "src.example")
    secret = new_secret()
    async with tls_serving(server) as (listener, address):
        listener.expect("mig-name", secret, ["gpu0"])
        with pytest.raises(PeerError, match=r"match|mismatch"):
            async with open_channel(
                address,
                "mig-name",
                secret,
                ["gpu0"],
                tls=TlsPeer(client.client_context(), "127.0.0.1"),
            ):
                pass
        # Under the name it carries, the same destination is accepted.
        peer = TlsPeer(client.client_context(), "dst.example")
        dest = listener.expect("mig-name-2", secret, ["gpu0"])
        async with open_channel(address, "mig-name-2", secret, ["gpu0"], tls=peer) as src:
            await pour(src.sender("gpu0"), b"hello over tls", 5)
            assert await drain(dest.receiver("gpu0")) == b"hello over tls"


async def test_an_expired_certificate_is_refused_both_ways(ca: trustme.CA, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    stale = tls_identity(
        ca,
        tmp_path / "expired",
        "127.0.0.1",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    good = identity(ca, tmp_path, "good", "127.0.0.1")
    secret = new_secret()
    # A destination whose certificate expired: the source refuses it.
    async with tls_serving(stale) as (listener, address):
        listener.expect("mig-old", secret, ["gpu0"])
        peer = TlsPeer(good.client_context(), "127.0.0.1")
        with pytest.raises(PeerError, match=r"certificate has expired"):
            async with open_channel(address, "mig-old", secret, ["gpu0"], tls=peer):
                pass
    # A source whose certificate expired: the destination refuses it.
    async with tls_serving(good) as (listener, address):
        listener.expect("mig-old", secret, ["gpu0"])
        peer = TlsPeer(stale.client_context(), "127.0.0.1")
        with pytest.raises(PeerError):
            async with open_channel(address, "mig-old", secret, ["gpu0"], tls=peer):
                pass
        assert any("expired" in r for r in listener.rejections), list(listener.rejections)


async def test_a_stranger_that_never_finishes_its_tls_handshake_is_closed(
    ca: trustme.CA, tmp_path: Path
) -> None:
    server = identity(ca, tmp_path, "dst", "127.0.0.1")
    async with tls_serving(server) as (listener, address):
        listener.handshake_timeout_s = 0.3
        silent = await raw_connect(address)
        async with silent:
            with trio.fail_after(10):
                assert await closed_on_us(silent)
        assert listener.statistics().refused.get(Refusal.TIMEOUT, 0) == 1
