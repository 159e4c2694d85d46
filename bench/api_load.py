"""REST API latency while migrations run: GET one migration, POST new ones.

Starts `orchestrator serve` on 127.0.0.1 (a free port) with a fresh state
directory and token, submits 50 slow migrations of simulated devices so that
they run throughout, then sends an open-loop load (requests leave on a fixed
schedule, whether earlier ones have answered or not, so a slow server cannot
slow the load down and hide its latency): GET /v1/migrations/{id} at the
target rate and POST /v1/migrations at a lower rate, for a bounded time,
loopback only.  Prints a table of achieved rate and p50/p99 latency.

    python bench/api_load.py [--rate 200] [--post-rate 5] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def one_device_plan(
    vm: str, device: str, destination: dict[str, Any], **source: Any
) -> dict[str, Any]:
    return {
        "vm": vm,
        "downtime_limit_ms": 1000,
        "devices": [
            {
                "name": device,
                "backend": "simulated",
                "source": {"transition_ms": 1, **source},
                "destination": destination,
            }
        ],
    }


def slow_plan(vm: str, device: str, state_mib: float) -> dict[str, Any]:
    # Drained at a sixteenth of its size per second: each migration runs for
    # about 16 s, whatever its size.
    return one_device_plan(
        vm, device, {"transition_ms": 1}, state_mib=state_mib, drain_mib_s=state_mib / 16, seed=1
    )


def quick_plan(vm: str, device: str) -> dict[str, Any]:
    return one_device_plan(vm, device, {}, state_mib=0.0625)


@contextlib.contextmanager
def daemon(workdir: Path) -> Iterator[tuple[str, str]]:
    """Run `orchestrator serve` on loopback; yields (base url, token)."""
    token = secrets.token_hex(16)
    token_file = workdir / "tokens"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_port()
    config = workdir / "orchestrator.toml"
    config.write_text(
        f'state_dir = "{workdir / "state"}"\n'
        "[api]\n"
        f'unix_socket = "{workdir / "api.sock"}"\n'
        f'tcp = "127.0.0.1:{port}"\n'
        f'token_file = "{token_file}"\n'
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--log-level",
            "error",
            "serve",
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"the daemon exited: {err}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not become ready within 30 s")
            time.sleep(0.1)
        yield url, token
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def open_loop(
    client: httpx.AsyncClient,
    rate: float,
    seconds: float,
    request: Any,
    latencies: list[float],
    errors: list[str],
) -> int:
    """Start ``request(i)`` every 1/rate s for ``seconds``; record each latency."""
    sent = 0

    async def one(i: int) -> None:
        start = time.perf_counter()
        try:
            response = await request(i)
            if response.status_code >= 400:
                errors.append(f"{response.status_code} {response.text[:80]}")
                return
        except httpx.HTTPError as exc:
            errors.append(type(exc).__name__)
            return
        latencies.append(time.perf_counter() - start)

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        while trio.current_time() - start < seconds:
            nursery.start_soon(one, sent)
            sent += 1
            await trio.sleep_until(start + sent / rate)
    return sent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(
    url: str, token: str, args: argparse.Namespace
) -> list[tuple[str, float, int, list[float], list[str]]]:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(
        max_connections=args.connections, max_keepalive_connections=args.connections
    )
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=30
    ) as client:
        ids = []
        for i in range(50):
            plan = slow_plan(f"bench-vm{i}", f"bench-gpu{i}", args.state_mib)
            r = await client.post("/v1/migrations", json=plan)
            r.raise_for_status()
            ids.append(r.json()["id"])
        get_lat: list[float] = []
        get_err: list[str] = []
        post_lat: list[float] = []
        post_err: list[str] = []
        results: dict[str, int] = {}

        async def gets() -> None:
            results["get"] = await open_loop(
                client,
                args.rate,
                args.seconds,
                lambda i: client.get(f"/v1/migrations/{ids[i % len(ids)]}"),
                get_lat,
                get_err,
            )

        async def posts() -> None:
            results["post"] = await open_loop(
                client,
                args.post_rate,
                args.seconds,
                lambda i: client.post(
                    "/v1/migrations", json=quick_plan(f"load-vm{i}", f"load-nic{i}")
                ),
                post_lat,
                post_err,
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(gets)
            nursery.start_soon(posts)
        running = 0
        for i in ids:
            status = await client.get(f"/v1/migrations/{i}")
            running += status.json()["outcome"] is None
        for i in ids:
            await client.post(f"/v1/migrations/{i}/cancel")
    print(f"migrations still running at the end of the load: {running} of 50")
    return [
        ("GET /v1/migrations/{id}", args.rate, results["get"], get_lat, get_err),
        ("POST /v1/migrations", args.post_rate, results["post"], post_lat, post_err),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="GET requests per second")
    parser.add_argument("--post-rate", type=float, default=5.0, help="POST requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the load lasts")
    parser.add_argument("--connections", type=int, default=16, help="client connection pool")
    parser.add_argument(
        "--state-mib", type=float, default=16.0, help="state of each running migration's device"
    )
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 120 and 0 < args.rate <= 5000 and 0 < args.post_rate <= 100):
        parser.error("keep the load bounded: seconds <= 120, rate <= 5000, post-rate <= 100")
    print(f"command: python bench/api_load.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpu, Python {platform.python_version()}; "
        f"{args.seconds:g} s of open-loop load over {args.connections} connections, "
        f"while 50 migrations of {args.state_mib:g} MiB devices run"
    )
    with tempfile.TemporaryDirectory() as tmp, daemon(Path(tmp)) as (url, token):
        rows = trio.run(measure, url, token, args)
    print("| request | target rate/s | achieved rate/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, target, sent, lat, errors in rows:
        achieved = len(lat) / args.seconds
        p50 = percentile(lat, 0.5) * 1000
        p99 = percentile(lat, 0.99) * 1000
        print(
            f"| {name} | {target:g} | {achieved:.0f} | {p50:.1f} | {p99:.1f} "
            f"| {len(errors)} of {sent} |"
        )
        if errors:
            print(f"  first errors: {errors[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
