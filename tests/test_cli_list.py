"""``orchestrator list`` and ``orchestrator devices`` against a real daemon (in process,
on its Unix socket), as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from orchestrator import cli
from tests.test_daemon import plan_body, running_daemon, settings_for, unix_client, wait_outcome


async def test_list_and_devices_show_what_the_daemon_holds(
    short_dir: Path, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = ["--socket", str(short_dir / "api.sock"), "--token-file", str(token_file)]

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await trio.to_thread.run_sync(cli.main, [*argv, *conn])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    async with running_daemon(settings_for(short_dir, token_file)):
        ids = []
        async with unix_client(short_dir / "api.sock") as client:
            for vm, device in (("vm-a", "gpu0"), ("vm-b", "nic0"), ("vm-a", "gpu1")):
                response = await client.post("/v1/migrations", json=plan_body(vm, device))
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])
                await wait_outcome(client, ids[-1])
        newest_first = ids[::-1]

        code, out, _ = await run("list")
        assert code == 0
        lines = out.splitlines()
        assert lines[0].split()[:4] == ["ID", "VM", "PHASE", "OUTCOME"]
        assert [line.split()[0] for line in lines[1:]] == newest_first
        assert all(" succeeded " in line and " done " in line for line in lines[1:])

        code, out, _ = await run("list", "--vm", "vm-a", "--json")
        body = json.loads(out)
        assert code == 0 and [m["id"] for m in body["migrations"]] == [ids[2], ids[0]]
        assert body["next_cursor"] is None
        assert {m["devices"] for m in body["migrations"]} == {1}

        code, out, err = await run("list", "--limit", "2")
        assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ids[:0:-1]
        assert "--all" in err  # there are more, and the operator is told how to see them
        code, out, _ = await run("list", "--limit", "2", "--json")
        assert json.loads(out)["next_cursor"] is not None
        code, out, err = await run("list", "--all")
        assert len(out.splitlines()) == 4 and err == ""

        code, out, _ = await run("list", "--since", "1h", "--outcome", "succeeded")
        assert code == 0 and len(out.splitlines()) == 4
        code, out, _ = await run("list", "--since", "2999-01-01T00:00:00Z")
        assert code == 0 and out == "no migrations match\n"
        code, _, err = await run("list", "--since", "yesterday")
        assert code == 2 and "query.since" in err

        code, out, _ = await run("devices")
        assert code == 0
        rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
        assert set(rows) == {"simulated:gpu0", "simulated:gpu1", "simulated:nic0"}
        # No migration holds them any more; each left its files (source and destination).
        assert all(row[3] == "-" and row[5] == "2" for row in rows.values())
        code, out, _ = await run("devices", "--json")
        devices = {d["device"]: d for d in json.loads(out)}
        gpu0 = devices["simulated:gpu0"]
        assert sorted(Path(f).parent.name for f in gpu0["files"]) == ["destination", "source"]
        sizes = [(await trio.Path(f).stat()).st_size for f in gpu0["files"]]
        assert gpu0["file_bytes"] == sum(sizes) > 0

    code, _, err = await run("list")
    assert code == 5 and "cannot reach the orchestrator" in err
    code, _, err = await run("devices")
    assert code == 5


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--outcome", "great"],
        ["list", "--phase", "nap"],
        ["list", "--limit", "0"],
        ["list", "--limit", "5", "--all"],
    ],
)
def test_list_refuses_bad_flags_as_bad_input(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == cli.ExitStatus.BAD_INPUT
    assert "usage: orchestrator list" in capsys.readouterr().err
