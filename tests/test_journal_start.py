"""What the daemon refuses at start, in one line and no traceback: a journal that lost
migrations its generation marker says it held (emptied, or without its ``-wal`` file
after a crash), and a state directory it cannot write in.  The daemon runs as a
process, as an operator starts it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from orchestrator.journal import FILENAME, GENERATION_FILE, Journal, JournalError
from tests.test_daemon import (
    _wait_ready,
    daemon_process,
    migration_in_precopy,
    plan_body,
    unix_client,
    wait_outcome,
)


def config_for(short_dir: Path, token_file: Path, state_dir: Path | None = None) -> Path:
    config = short_dir / "orchestrator.toml"
    config.write_text(
        f'state_dir = "{state_dir or short_dir / "state"}"\n'
        "shutdown_grace_s = 2\n"
        f'[api]\nunix_socket = "{short_dir / "api.sock"}"\ntoken_file = "{token_file}"\n'
    )
    return config


async def refused_at_start(config: Path, log: Path) -> str:
    """The daemon exits 5 at start; its one line of complaint."""
    async with daemon_process(config, log) as process:
        with trio.fail_after(30):
            code = await process.wait()
    text = await trio.Path(log).read_text()
    assert code == 5, text
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.startswith("orchestrator serve:")]
    assert len(lines) == 1, text
    return lines[0]


async def crashed_with_a_migration_in_flight(short_dir: Path, config: Path) -> str:
    """A daemon SIGKILLed with one migration done and one in pre-copy; their ids."""
    log = short_dir / "first.log"
    socket_path = short_dir / "api.sock"
    async with daemon_process(config, log) as process:
        await _wait_ready(socket_path, process, log)
        async with unix_client(socket_path) as client:
            response = await client.post("/v1/migrations", json=plan_body("vm0", "nic0"))
            await wait_outcome(client, response.json()["id"])
            migration_id = await migration_in_precopy(client)
        process.send_signal(signal.SIGKILL)
        await process.wait()
    return migration_id


async def test_a_journal_without_its_wal_after_a_crash_is_refused(
    short_dir: Path, token_file: Path
) -> None:
    config = config_for(short_dir, token_file)
    state = short_dir / "state"
    migration_id = await crashed_with_a_migration_in_flight(short_dir, config)
    wal = state / f"{FILENAME}-wal"
    assert wal.exists()  # the crash left the recent commits there
    saved = wal.read_bytes()
    wal.unlink()
    (state / f"{FILENAME}-shm").unlink(missing_ok=True)

    line = await refused_at_start(config, short_dir / "second.log")
    assert GENERATION_FILE in line and "-wal" in line and "generation" in line

    # Put back, the journal is whole: the daemon starts and recovers the migration.
    wal.write_bytes(saved)
    log = short_dir / "third.log"
    async with daemon_process(config, log) as process:
        await _wait_ready(short_dir / "api.sock", process, log)
        async with unix_client(short_dir / "api.sock") as client:
            status = await wait_outcome(client, migration_id)
            assert status["outcome"] == "rolled_back"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0


async def test_an_emptied_journal_is_refused_and_a_clean_copy_is_not(
    short_dir: Path, token_file: Path
) -> None:
    config = config_for(short_dir, token_file)
    state = short_dir / "state"
    log = short_dir / "first.log"
    async with daemon_process(config, log) as process:
        await _wait_ready(short_dir / "api.sock", process, log)
        async with unix_client(short_dir / "api.sock") as client:
            response = await client.post("/v1/migrations", json=plan_body("vm0", "nic0"))
            await wait_outcome(client, response.json()["id"])
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    # A clean stop: SQLite folded the WAL into the file and removed it; the file alone
    # is the whole journal, and is taken.
    assert not (state / f"{FILENAME}-wal").exists()
    async with await Journal.open(state) as journal:
        assert len(await journal.list()) == 1

    os.truncate(state / FILENAME, 0)
    line = await refused_at_start(config, short_dir / "second.log")
    assert "is empty" in line and GENERATION_FILE in line
    # Starting afresh is a deliberate act: moving the marker away.
    (state / GENERATION_FILE).rename(state / f"{GENERATION_FILE}.old")
    async with await Journal.open(state) as journal:
        assert await journal.list() == []


async def test_a_marker_that_is_not_one_is_refused(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path):
        pass
    (tmp_path / GENERATION_FILE).write_text("seven\n")
    with pytest.raises(JournalError, match="not a generation"):
        await Journal.open(tmp_path)


async def test_a_state_dir_it_cannot_write_in_is_refused_in_one_line(
    short_dir: Path, token_file: Path
) -> None:
    # Not a file mode (these tests may run as root, whom modes do not stop): a
    # directory of the kernel's in which no one may create a file.
    unwritable = Path("/proc/self/fdinfo")
    if not await trio.Path(unwritable).is_dir():
        pytest.skip("no /proc/self/fdinfo: no directory that refuses every writer")
    line = await refused_at_start(
        config_for(short_dir, token_file, unwritable), short_dir / "daemon.log"
    )
    assert "cannot create" in line and str(unwritable) in line
