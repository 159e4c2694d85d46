"""Crash recovery, for real: kill -9 the daemon in each phase, restart it, check.

The simulated devices keep their state in files under the state directory,
as hardware outlives a daemon crash.  After the restart, every VM must end
with exactly one side running, every digest intact (the destination holds
the source's state, or the source holds its own), and nothing the journal
had recorded before the kill may be lost.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from orchestrator.backends import backends_for
from orchestrator.backends.simulated import SimulatedDevice, SimulatedParams, reference_digest
from orchestrator.journal import Journal
from orchestrator.states import DeviceState, Side
from tests.test_daemon import _start_process, _wait_ready, unix_client

pytestmark = pytest.mark.slow

#: Slow arcs (150 ms each) so that every phase lasts long enough to be caught.
SOURCE = {"state_mib": 0.5, "dirty_mib_s": 0.25, "transition_ms": 150, "drain_mib_s": 2}
DEVICES = ["gpu0", "gpu1"]


def plan_body() -> dict[str, Any]:
    return {
        "vm": "vm-crash",
        "downtime_limit_ms": 5000,
        "devices": [
            {
                "name": name,
                "backend": "simulated",
                "source": {**SOURCE, "seed": i},
                "destination": {"transition_ms": 150},
            }
            for i, name in enumerate(DEVICES)
        ],
    }


def write_config(base: Path, token_file: Path) -> Path:
    config = base / "orchestrator.toml"
    config.write_text(
        f'state_dir = "{base / "state"}"\n'
        f'[api]\nunix_socket = "{base / "api.sock"}"\ntoken_file = "{token_file}"\n'
    )
    return config


async def open_device(state_dir: Path, side: Side, name: str, seed: int) -> SimulatedDevice:
    backend = backends_for(state_dir)["simulated"]
    params = SimulatedParams.model_validate({**SOURCE, "seed": seed})
    if side is Side.DESTINATION:
        params = SimulatedParams.model_validate(
            {**backend.destination_defaults(params), "transition_ms": 150}
        )
    device = backend.create(name, side, params)
    assert isinstance(device, SimulatedDevice)
    await device.open()
    return device


# Phases that last long enough to kill the daemon in.  COMMIT itself is one
# journal write: a kill "in" it lands just before or just after the record,
# which the phases on either side of it already cover.
PHASES = [
    "prepare",
    "precopy",
    "source_grace",
    "stop_copy",
    "destination_grace",
    "resume",
    "release",
]


async def follow_until_phase(client: httpx.AsyncClient, migration_id: str, phase: str) -> int:
    """Follow the event stream until the migration enters ``phase``; events seen so far."""
    if phase == "prepare":
        return 1  # the migration starts in it
    seen = 0
    with trio.fail_after(30):
        async with client.stream("GET", f"/v1/migrations/{migration_id}/events") as response:
            async for line in response.aiter_lines():
                if line.startswith("id:"):
                    seen += 1
                if line.startswith("data:"):
                    detail = json.loads(line[5:]).get("detail") or {}
                    if detail.get("phase") == phase:
                        return seen
    raise AssertionError(f"the migration ended before phase {phase}")


@pytest.mark.parametrize("phase", PHASES)
async def test_kill_9_in_each_phase_then_restart_recovers(
    short_dir: Path, token_file: Path, phase: str
) -> None:
    config = write_config(short_dir, token_file)
    socket_path = short_dir / "api.sock"
    state_dir = short_dir / "state"
    log = short_dir / "daemon.log"

    process = await _start_process(config, log)
    try:
        await _wait_ready(socket_path, process, log)
        async with unix_client(socket_path) as client:
            response = await client.post("/v1/migrations", json=plan_body())
            assert response.status_code == 201, response.text
            migration_id = response.json()["id"]
            events_before = await follow_until_phase(client, migration_id, phase)
        process.send_signal(signal.SIGKILL)
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    async with await Journal.open(state_dir) as journal:
        record = await journal.get(migration_id)
        assert record is not None and record.outcome is None, "the kill left it unfinished"
        committed = record.committed
        recorded_phase = record.phase
        journaled_events = len(await journal.events(migration_id))

    # A new daemon on the same state directory recovers before it is ready.
    process = await _start_process(config, short_dir / "daemon2.log")
    try:
        await _wait_ready(socket_path, process, short_dir / "daemon2.log")
        async with unix_client(socket_path) as client:
            # Ready means this host's devices are settled (service._recover_one); the
            # outcome shows once it is journaled, a moment later (1 run in about 6 read
            # it before then).  The deadline only bounds a hang.
            with trio.fail_after(60):
                while True:
                    status = (await client.get(f"/v1/migrations/{migration_id}")).json()
                    if status["outcome"] is not None:
                        break
                    await trio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    # Killed before pre-copy began: it ends refused, every device as it was.
    expected = "succeeded" if committed else "rolled_back"
    if recorded_phase == "prepare":
        expected = "refused"
    assert status["outcome"] == expected, status
    report = status["report"]
    async with await Journal.open(state_dir) as journal:
        record = await journal.get(migration_id)
        assert record is not None and record.outcome == expected
        assert len(await journal.events(migration_id)) >= journaled_events
        assert await journal.unfinished() == []
    assert events_before > 0

    # The devices themselves: exactly one side runs, and the state is intact.
    for seed, name in enumerate(DEVICES):
        src = await open_device(state_dir, Side.SOURCE, name, seed)
        dst = await open_device(state_dir, Side.DESTINATION, name, seed)
        try:
            if committed:
                assert src.state is DeviceState.STOP and dst.state is DeviceState.RUNNING
                assert await dst.state_digest() == await src.state_digest()
            else:
                assert src.state is DeviceState.RUNNING and dst.state is DeviceState.RUNNING
                assert src.resets == 0
                digest = await src.state_digest()
                assert digest == reference_digest(src.params, src.mutations)
                assert dst.resets >= 1  # recovery resets every destination
        finally:
            await src.close()
            await dst.close()
    assert {d["name"] for d in report["devices"]} == set(DEVICES)
