"""Two hosts made of network namespaces joined by a veth pair, a daemon in each.

The source daemon runs in one namespace, the destination daemon in the
other, and the data channel crosses the veth link, so that cutting the link
(``ip link set down``) cuts the migration for real.  Needs root and
``ip netns``; skipped, with the reason printed, where they are missing.

``tc netem`` shaping (delay, rate) is tested where the kernel has the netem
qdisc: this machine's host kernel does not (``Specified qdisc kind is
unknown``), so that test says so and skips; the kernel lab's guest kernel
has it (``sch_netem``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.two_daemons import Host, Placement, ended, two_daemons, until

pytestmark = pytest.mark.slow


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"orch-probe-{secrets.token_hex(3)}"
    out = _run("ip", "netns", "add", probe)
    if out.returncode != 0:
        return f"ip netns add failed: {out.stderr.strip()}"
    _run("ip", "netns", "del", probe)
    return None


@dataclass
class Namespaces:
    source: str
    destination: str
    source_if: str
    destination_if: str
    source_ip: str
    destination_ip: str

    def exec(self, ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", ns, *argv)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    reason = _why_no_netns()
    if reason is not None:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    n = Namespaces(
        source=f"orch-src-{tag}",
        destination=f"orch-dst-{tag}",
        source_if=f"vs{tag}",
        destination_if=f"vd{tag}",
        source_ip="10.231.7.1",
        destination_ip="10.231.7.2",
    )
    steps = [
        ("ip", "netns", "add", n.source),
        ("ip", "netns", "add", n.destination),
        ("ip", "link", "add", n.source_if, "type", "veth", "peer", "name", n.destination_if),
        ("ip", "link", "set", n.source_if, "netns", n.source),
        ("ip", "link", "set", n.destination_if, "netns", n.destination),
    ]
    try:
        for step in steps:
            out = _run(*step)
            assert out.returncode == 0, f"{' '.join(step)}: {out.stderr}"
        for ns, dev, ip in (
            (n.source, n.source_if, n.source_ip),
            (n.destination, n.destination_if, n.destination_ip),
        ):
            for step in (
                ("ip", "addr", "add", f"{ip}/24", "dev", dev),
                ("ip", "link", "set", dev, "up"),
                ("ip", "link", "set", "lo", "up"),
            ):
                out = n.exec(ns, *step)
                assert out.returncode == 0, f"{' '.join(step)}: {out.stderr}"
        yield n
    finally:
        _run("ip", "netns", "del", n.source)
        _run("ip", "netns", "del", n.destination)


def placements(n: Namespaces) -> tuple[Placement, Placement]:
    """A daemon in each namespace.  Generous starts: under the kernel lab's TCG
    emulation a daemon takes 15-60 s to start."""
    return (
        Placement(n.source_ip, ("ip", "netns", "exec", n.source), ready_s=180),
        Placement(n.destination_ip, ("ip", "netns", "exec", n.destination), ready_s=180),
    )


@contextlib.asynccontextmanager
async def daemon_pair(
    n: Namespaces, base: Path, token_file: Path
) -> AsyncIterator[tuple[Host, Host]]:
    """(source, destination): a daemon in each namespace, ready, stopped after."""
    async with two_daemons(base, token_file, processes=True, placements=placements(n)) as pair:
        yield pair


async def submit(source: Host, plan: dict[str, Any]) -> str:
    return await source.submit(plan)


async def outcome(daemon: Host, path: str, seconds: float = 240) -> dict[str, Any]:
    """The status at ``path`` once it has an outcome."""

    async def probe() -> dict[str, Any]:
        body: dict[str, Any] = (await daemon.get(path))[1]
        return body

    return await until(probe, ended, seconds)


async def wait_sent(source: Host, migration_id: str, nbytes: int, seconds: float) -> None:
    """Until the running migration has sent more than ``nbytes``."""

    def sent(body: dict[str, Any]) -> bool:
        assert body["outcome"] is None, body
        total: int = sum((body.get("progress") or {}).get("bytes_sent", {}).values())
        return total > nbytes

    await until(lambda: source.status(migration_id), sent, seconds)


async def test_a_link_cut_mid_stream_rolls_back_and_the_destination_resets(
    namespaces: Namespaces, short_dir: Path, token_file: Path
) -> None:
    n = namespaces
    async with daemon_pair(n, short_dir, token_file) as (source, destination):
        plan = {
            "vm": "vm-netns",
            "downtime_limit_ms": 500,
            # Slow enough that the cut lands in the middle of pre-copy.
            "bandwidth_limit_mib_s": 8,
            "timeouts": {"device_call_s": 6},
            "destination": {
                "url": f"http://{n.destination_ip}:7800",
                "token_file": str(token_file),
            },
            "devices": [
                {"name": f"gpu{i}", "backend": "simulated", "source": {"state_mib": 16, "seed": i}}
                for i in range(2)
            ],
        }
        migration_id = await submit(source, plan)
        await wait_sent(source, migration_id, 4 << 20, 20)
        out = n.exec(n.source, "ip", "link", "set", n.source_if, "down")
        assert out.returncode == 0, out.stderr
        status = await outcome(source, f"/v1/migrations/{migration_id}", 60)
        report = status["report"]
        assert status["outcome"] == "rolled_back", json.dumps(report, indent=1)
        assert report["committed"] is False
        kinds = ("peer_error", "device_error", "device_timeout")
        assert report["error"]["kind"] in kinds, report["error"]
        assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
        # The destination, cut off before its vote, reset its devices by itself
        # and freed them; how the migration ended it learns from the source.
        far = await until(
            lambda: destination.incoming(migration_id), lambda s: s["phase"] == "aborted", 60
        )
        assert far["outcome"] is None, far
        assert {d["state"] for d in far["devices"].values()} == {"RUNNING"}
        assert all(d["reset"] for d in far["devices"].values())
        _, devices = await destination.get("/v1/devices")
        assert all(d["migration"] is None for d in devices), devices
        # Once the link is back, it asks and both journals agree.
        out = n.exec(n.source, "ip", "link", "set", n.source_if, "up")
        assert out.returncode == 0, out.stderr
        far = await outcome(destination, f"/v1/incoming/{migration_id}", 120)
        assert far["outcome"] == "rolled_back", far
        assert far["committed"] is False


def test_netem_shaping_where_the_kernel_has_it(namespaces: Namespaces) -> None:
    out = namespaces.exec(
        namespaces.destination,
        "tc", "qdisc", "add", "dev", namespaces.destination_if, "root",
        "netem", "delay", "2ms", "rate", "1gbit",
    )  # fmt: skip
    if out.returncode != 0:
        pytest.skip(
            f"this kernel ({os.uname().release}) has no netem qdisc ({out.stderr.strip()}); "
            "the kernel lab's guest kernel has sch_netem"
        )
    ping = namespaces.exec(
        namespaces.source, "ping", "-c", "3", "-i", "0.2", "-q", namespaces.destination_ip
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # rtt min/avg/max/mdev = a/b/c/d ms: the 2 ms one-way delay shows in the minimum.
    rtt_min = float(ping.stdout.rsplit("=", 1)[1].split("/")[0])
    assert rtt_min >= 2.0, ping.stdout
