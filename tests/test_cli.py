"""The command line, called as users call it: main(argv) and the installed script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main

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
