"""The command line, called as users call it: main(argv) and the installed script."""

from __future__ import annotations

import http.server
import json
import re
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

import pytest

from orchestrator import cli
from orchestrator.api.models import MigrationEvent
from orchestrator.cli import OUTCOME_EXIT_STATUS, ExitStatus, exit_status, main
from orchestrator.report import ErrorInfo, MigrationReport, Outcome
from orchestrator.service import MigrationStatus

PLANS = Path(__file__).resolve().parent.parent / "config" / "plans"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """
vm = "vm1"
downtime_limit_ms = 300
[[devices]]
name = "gpu0"
backend = "simulated"
source = { state_mib = 0.25, transition_ms = 1, seed = 4 }
"""


def test_run_embedded_default_prints_a_complete_json_report(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--log-level", "warning", "run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outcome"] == "succeeded" and report["error"] is None
    assert report["downtime_ms"] > 0 and report["duration_ms"] >= report["downtime_ms"]
    assert {"prepare", "precopy", "stop_copy", "resume"} <= report["phases"].keys()
    assert [d["name"] for d in report["devices"]] == ["gpu0", "gpu1", "nic0"]
    for d in report["devices"]:
        for key in (
            "name",
            "backend",
            "source_state",
            "destination_state",
            "bytes_precopy",
            "bytes_stopcopy",
            "source_digest",
            "destination_digest",
        ):
            assert key in d
        assert d["source_digest"] == d["destination_digest"]
        assert (d["source_state"], d["destination_state"]) == ("STOP", "RUNNING")


def test_run_prints_a_human_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(write(tmp_path, "p.toml", GOOD))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("VM vm1: succeeded")
    assert "gpu0" in out and "identical" in out


def test_a_fault_after_the_commit_point_fails_and_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The destination device fails as it starts running: past the commit, so
    # the VM is the destination's and an operator is needed.
    plan = write(
        tmp_path, "p.toml", GOOD + 'destination = { fault = { at = "RUNNING", kind = "error" } }\n'
    )
    assert main(["--log-level", "error", "run", "--json", str(plan)]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["outcome"] == "failed" and report["committed"]
    assert report["error"]["side"] == "destination"


def test_fault_plan_rolls_back_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["--log-level", "error", "run", "--json", str(PLANS / "fault-destination-corrupt.toml")]
    )
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["outcome"] == "rolled_back"
    assert report["error"]["device"] == "gpu1" and report["error"]["side"] == "destination"
    assert {d["source_state"] for d in report["devices"]} == {"RUNNING"}
    assert all(d["destination_reset"] for d in report["devices"])


@pytest.mark.parametrize("plan", sorted(p.name for p in PLANS.glob("*.toml")))
def test_example_plans_validate_as_documented(
    plan: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["validate", str(PLANS / plan)])
    out = capsys.readouterr().out
    if plan.startswith("refused"):
        assert code == 2
        assert "devices[1]" in out and "'nic0'" in out and "p2p = false" in out
    else:
        assert code == 0, out


def test_sixty_four_device_example_migrates(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["--log-level", "error", "run", "--json", str(PLANS / "sixty-four-devices.toml")]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert len(report["devices"]) == 64
    assert report["barriers"]["source_p2p"]["members"] == 64


BAD_PLANS = {
    "missing.toml": (None, "cannot read plan"),
    "plan.yaml": ("vm: x", "plan files end in .toml or .json"),
    "broken.toml": ("vm = ", "invalid TOML"),
    "broken.json": ('{"vm": ', "invalid JSON at line 1"),
    "types.toml": (
        'vm = "v"\ndowntime_limit_ms = "soon"\n[[devices]]\nname = "a"\nbackend = "simulated"\n',
        "downtime_limit_ms: Input should be a valid number",
    ),
    "unknown.toml": (
        'vm = "v"\ndowntime_limit_ms = 5\ncolour = "red"\n'
        '[[devices]]\nname = "a"\nbackend = "simulated"\n',
        "colour: unknown field",
    ),
    "backend.toml": (
        'vm = "v"\ndowntime_limit_ms = 5\n[[devices]]\nname = "a"\nbackend = "gpu-magic"\n',
        "devices[0].backend: unknown backend 'gpu-magic'",
    ),
    "params.toml": (
        'vm = "v"\ndowntime_limit_ms = 5\n[[devices]]\nname = "a"\nbackend = "simulated"\n'
        "source = { state_mib = -1, wings = 2 }\n",
        "devices[0].source.state_mib",
    ),
    "dupes.toml": (
        'vm = "v"\ndowntime_limit_ms = 5\n[[devices]]\nname = "a"\nbackend = "simulated"\n'
        '[[devices]]\nname = "a"\nbackend = "simulated"\n',
        "used more than once",
    ),
    "nodevices.json": (
        '{"vm": "v", "downtime_limit_ms": 5, "devices": []}',
        "devices: List should have at least 1",
    ),
    "fault.toml": (
        'vm = "v"\ndowntime_limit_ms = 5\n[[devices]]\nname = "a"\nbackend = "simulated"\n'
        'source = { fault = { at = "SOMEWHERE", kind = "error" } }\n',
        "devices[0].source.fault.at",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_plans_get_a_clear_error_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, command: str
) -> None:
    text, expected = BAD_PLANS[name]
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert main([command, str(path)]) == 2
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert expected in shown
    assert "Traceback" not in shown


def test_validate_reports_every_problem_not_just_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        'vm = "v"\ndowntime_limit_ms = 5\n'
        '[[devices]]\nname = "a"\nbackend = "simulated"\nsource = { state_mib = 0 }\n'
        '[[devices]]\nname = "b"\nbackend = "simulated"\ndestination = { page_kib = 3 }\n'
    )
    assert main(["validate", "--json", str(write(tmp_path, "p.toml", text))]) == 2
    result = json.loads(capsys.readouterr().out)
    paths = {p["path"] for p in result["problems"]}
    assert "devices[0].source.state_mib" in paths
    assert any(p.startswith("devices[1].destination") for p in paths)


def test_states_prints_the_arc_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["states", "--flags", "p2p"]) == 0
    out = capsys.readouterr().out
    assert "RUNNING_P2P" in out and "PRE_COPY" not in out.replace("PRE_COPY_P2P", "")
    assert main(["states", "--flags", "warp"]) == 2


def test_the_installed_script_runs_and_reports_its_version() -> None:
    exe = Path(sys.executable).parent / "orchestrator"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("orchestrator ")
    done = subprocess.run(
        [exe, "run", str(PLANS / "refused-non-p2p-mix.toml")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "nic0" in done.stderr


# -- exit statuses -----------------------------------------------------------------------

#: Issue 18's contract, written out: a change to it must change this test too.
CONTRACT = {"succeeded": 0, "rolled_back": 1, "failed": 3, "refused": 4}


@pytest.mark.parametrize("outcome", get_args(Outcome))
def test_every_outcome_has_its_exit_status(outcome: Outcome) -> None:
    assert exit_status(outcome) == CONTRACT[outcome]
    assert OUTCOME_EXIT_STATUS[outcome].meaning


def test_the_exit_statuses_do_not_collide() -> None:
    assert sorted(OUTCOME_EXIT_STATUS) == sorted(CONTRACT)
    codes = [int(s) for s in ExitStatus]
    assert codes == sorted(set(codes)) == list(range(6))
    assert ExitStatus(2) is ExitStatus.BAD_INPUT
    # The daemon out of reach is told apart from every outcome and from bad input.
    assert ExitStatus.UNAVAILABLE not in {*OUTCOME_EXIT_STATUS.values(), ExitStatus.BAD_INPUT}


def table_rows(text: str) -> list[tuple[int, str]]:
    """(status, label) of each row of a table whose rows start with a status."""
    found = re.findall(r"^\|? *(\d) *\|? +(\w+(?: \w+)?)[: ]", text, re.MULTILINE)
    return [(int(code), label) for code, label in found]


def test_help_docstring_and_readme_show_the_one_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    expected = [(int(s), s.label) for s in ExitStatus]
    for argv in (["--help"], ["run", "--help"], ["watch", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert cli.exit_status_help() in out, argv
    assert table_rows(cli.exit_status_help()) == expected
    assert cli.__doc__ is not None
    assert table_rows(cli.__doc__.split("::", 1)[1]) == expected
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("Exit status, one table", 1)[1].split("\n\n", 2)[1]
    assert table_rows(section) == expected


# -- the client verbs' exit statuses, against a stand-in daemon ------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, answers: Mapping[str, tuple[int, str, str]]) -> None:
        self.answers = answers
        super().__init__(str(path), _Answer)


class _Answer(http.server.BaseHTTPRequestHandler):
    server: _UnixHTTPServer

    def do_GET(self) -> None:
        status, content_type, body = self.server.answers[self.path]
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def stand_in_daemon(
    short_dir: Path, answers: Mapping[str, tuple[int, str, str]]
) -> Iterator[list[str]]:
    """An HTTP server on a Unix socket giving fixed answers by path, as the daemon
    would give them; yields the connection arguments of the client verbs."""
    socket_path = short_dir / "api.sock"
    token = short_dir / "tokens"
    token.write_text("token\n")
    with _UnixHTTPServer(socket_path, answers) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield ["--socket", str(socket_path), "--token-file", str(token)]
        finally:
            server.shutdown()
            thread.join()


def ended(outcome: Outcome | None) -> dict[str, tuple[int, str, str]]:
    """The answers about migration m1, which ended so (None: still running)."""
    report = None
    if outcome is not None:
        error = None if outcome == "succeeded" else ErrorInfo(kind="peer_error", message="no")
        report = MigrationReport(id="m1", vm="vm1", outcome=outcome, duration_ms=5.0, error=error)
    status = MigrationStatus(
        id="m1",
        vm="vm1",
        phase="done" if outcome else "precopy",
        outcome=outcome,
        committed=outcome in ("succeeded", "failed"),
        created_at=1.0,
        report=report,
    )
    event = MigrationEvent(
        migration_id="m1", seq=1, time=1.0, kind="phase", detail={"phase": status.phase}
    )
    return {
        "/v1/migrations/m1": (200, "application/json", status.model_dump_json()),
        "/v1/migrations/m1/events": (
            200,
            "text/event-stream",
            f"id: 1\nevent: phase\ndata: {event.model_dump_json()}\n\n",
        ),
    }


@pytest.mark.parametrize("outcome", get_args(Outcome))
def test_watch_exits_with_the_outcome(
    short_dir: Path, capsys: pytest.CaptureFixture[str], outcome: Outcome
) -> None:
    with stand_in_daemon(short_dir, ended(outcome)) as connection:
        assert main(["watch", "m1", "--no-progress", *connection]) == CONTRACT[outcome]
        # status does not follow the migration: it did what was asked.
        assert main(["status", "m1", *connection]) == 0
    out = capsys.readouterr().out
    assert f"migration m1: VM vm1, {outcome}, phase done" in out


def test_a_stream_that_ends_without_an_outcome_is_no_outcome(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with stand_in_daemon(short_dir, ended(None)) as connection:
        assert main(["watch", "m1", "--no-progress", *connection]) == 5
    assert "ended before its outcome" in capsys.readouterr().err


def test_a_daemon_that_answers_5xx_or_not_at_all_is_unavailable(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutting_down = json.dumps({"error": {"kind": "shutting_down", "message": "stopping"}})
    answers = {"/v1/migrations/m1": (503, "application/json", shutting_down)}
    with stand_in_daemon(short_dir, answers) as connection:
        assert main(["status", "m1", *connection]) == 5
        assert main(["watch", "m1", *connection]) == 5
    assert "stopping (503 shutting_down)" in capsys.readouterr().err
    assert main(["watch", "m1", *connection]) == 5  # the socket is gone
    assert "cannot reach the orchestrator" in capsys.readouterr().err


def test_validate_prints_the_order_a_plan_will_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(PLANS / "one-nic-without-p2p.toml")]) == 0
    out = capsys.readouterr().out
    assert "order: source: grace [gpu0, gpu1] -> stop [nic0] -> stop [gpu0, gpu1]" in out
    assert "order: destination: grace [gpu0, gpu1] -> run [nic0] -> run [gpu0, gpu1]" in out
    assert main(["validate", "--json", str(PLANS / "two-gpus-one-nic.toml")]) == 0
    order = json.loads(capsys.readouterr().out)["order"]
    assert order["source"] == [
        {"step": "grace", "devices": ["gpu0", "gpu1", "nic0"]},
        {"step": "stop", "devices": ["gpu0", "gpu1", "nic0"]},
    ]
    code = main(["validate", str(PLANS / "refused-non-p2p-mix.toml")])
    out = capsys.readouterr().out
    assert code == 2 and "'nic0', 'nic1'" in out and "no order helps" in out
