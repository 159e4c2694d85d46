"""Device identities: compared before any device leaves RUNNING, on one host and two.

The pure comparison and the ``[compat]`` policy first, then the simulated
backend end to end: a difference nothing accepts ends the migration
``refused`` (exit 4 for ``run``; 201 then ``refused`` for the API) with an
error naming the device, the field and both values, and no device moved on
either side; the plan's ``accept_differences`` or a ``[[compat.rules]]`` entry
lets it through, and the report (journaled) says what accepted it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator import cli
from orchestrator.compat import (
    CompatRule,
    CompatSettings,
    Identity,
    compare,
    route_needs,
    rule_problems,
    version_key,
)
from orchestrator.engine import Migration
from orchestrator.errors import PlanError
from orchestrator.settings import Settings, SettingsError
from tests.helpers import make_resolved, sim_device
from tests.two_daemons import cross_plan, two_daemons, until

CAPS = ("P2P", "PRE_COPY", "STOP_COPY")


def sim(model: str = "sim", firmware: str = "1.0", caps: tuple[str, ...] = CAPS) -> Identity:
    return Identity("simulated", model, {"model": model, "firmware": firmware, "migration": caps})


# -- the comparison ------------------------------------------------------------------------


def test_equal_identities_pass_and_a_difference_names_device_field_and_values() -> None:
    assert compare("gpu0", sim(), sim(), needs=CAPS).mismatches == []
    verdict = compare("gpu0", sim(firmware="1.2"), sim(firmware="1.3"), needs=CAPS)
    (mismatch,) = verdict.mismatches
    assert mismatch.message == "device 'gpu0': firmware differs: source '1.2', destination '1.3'"
    assert verdict.accepted == []
    two = compare("gpu0", sim("h100"), sim("h200", "2.0"))
    assert [m.field for m in two.mismatches] == ["firmware", "model"]


def test_a_field_one_end_cannot_read_is_refused_unless_the_plan_accepts_it() -> None:
    # A handed-over device its host cannot trace to sysfs reports no mdev type: its
    # config-space IDs are every mtty type's, so nothing proves the two match.
    source = Identity("vfio", "mtty-1", {"mdev_type": "mtty-1", "vendor": "0x4348"})
    destination = Identity("vfio", "0x4348:0x3253", {"vendor": "0x4348"})
    verdict = compare("tty0", source, destination)
    (mismatch,) = verdict.mismatches
    assert mismatch.message == (
        "device 'tty0': mdev_type differs: source 'mtty-1', destination none "
        "(known on the source only: the other end cannot tell)"
    )
    assert verdict.unknown == ["device 'tty0': mdev_type known on the source only"]
    # A peer that leaves fields out cannot make the check vacuous either.
    bare = Identity("simulated", "h100", {})
    assert {m.field for m in compare("gpu0", sim(), bare).mismatches} == {"model", "firmware"}
    accepted = compare("tty0", source, destination, accept=["mdev_type"])
    assert accepted.mismatches == [] and accepted.accepted[0].by.startswith("the plan's")


def test_a_peer_s_identity_numbers_must_be_in_range() -> None:
    for bad in (-1, 1 << 64):
        with pytest.raises(TypeError, match="out of range"):
            Identity.from_json({"backend": "vhost_vdpa", "model": "1", "fields": {"features": bad}})


def test_a_version_range_holds_no_value_without_a_version() -> None:
    rule = CompatRule(backend="simulated", field="firmware", min="535.0")
    for value in ("unknown", "N/A", "", "-"):
        assert not rule.accepts("535.54", value), value
    assert rule.accepts("535.54", "550.1")
    only_max = CompatRule(backend="simulated", field="firmware", max="2.0")
    assert not only_max.accepts("1.0", "")


def test_the_plan_accepts_the_fields_it_names() -> None:
    verdict = compare("gpu0", sim(firmware="1"), sim(firmware="9"), accept=["firmware"])
    assert verdict.mismatches == []
    (accepted,) = verdict.accepted
    assert accepted.as_json() == {
        "device": "gpu0",
        "field": "firmware",
        "source": "1",
        "destination": "9",
        "by": "the plan's accept_differences",
    }
    # Another field is still compared.
    other = compare("gpu0", sim("a", "1"), sim("b", "9"), accept=["firmware"])
    assert [m.field for m in other.mismatches] == ["model"]


def test_capabilities_are_compatibility_not_equality() -> None:
    full, bare = sim(), sim(caps=("STOP_COPY",))
    # The destination has more than the route uses: fine, either way round for P2P.
    assert compare("d", bare, full, needs=("STOP_COPY",)).mismatches == []
    # The route pre-copies: the destination must have PRE_COPY.
    needs = route_needs(precopy=True, grace=False)
    assert needs == ("PRE_COPY", "STOP_COPY")
    (mismatch,) = compare("d", full, bare, needs=needs).mismatches
    assert mismatch.field == "migration"
    assert "the route uses PRE_COPY, which the destination lacks" in mismatch.message
    # No acceptance waives it.
    assert compare("d", full, bare, needs=needs, accept=["migration"]).mismatches


def test_features_need_a_superset() -> None:
    def vdpa(features: int) -> Identity:
        return Identity("vhost_vdpa", "virtio-1", {"device_id": 1, "features": features})

    assert compare("nic0", vdpa(0b0101), vdpa(0b1101)).mismatches == []
    (mismatch,) = compare("nic0", vdpa(0b1101), vdpa(0b0101)).mismatches
    assert "does not offer feature bits 0x8 the source offers" in mismatch.message


def test_version_order_reads_numbers_as_numbers() -> None:
    assert version_key("1.10") > version_key("1.9")
    assert version_key("535.104.05") > version_key("535.54.03")
    assert version_key("2.0") == version_key("2-0")
    assert version_key("2.0a") > version_key("2.0")


def rule(**fields: Any) -> CompatSettings:
    return CompatSettings(rules=[CompatRule(backend="simulated", field="firmware", **fields)])


def test_a_range_accepts_upgrades_within_it_and_no_downgrade_unless_told() -> None:
    policy = rule(min="1.2", max="1.20")  # 1.10 is within: versions, not text
    up = compare("g", sim(firmware="1.2"), sim(firmware="1.10"), policy=policy)
    assert up.mismatches == [] and up.accepted[0].by.startswith("compat.rules[0] (simulated")
    down = compare("g", sim(firmware="1.10"), sim(firmware="1.2"), policy=policy)
    assert [m.field for m in down.mismatches] == ["firmware"]
    outside = compare("g", sim(firmware="1.1"), sim(firmware="1.2"), policy=policy)
    assert outside.mismatches
    both_ways = rule(min="1.2", max="1.9", downgrade=True)
    assert compare("g", sim(firmware="1.9"), sim(firmware="1.2"), policy=both_ways).accepted


def test_a_list_and_a_model_narrow_a_rule() -> None:
    policy = rule(values=["1.2", "1.4"], model="a100")
    assert compare("g", sim("a100", "1.2"), sim("a100", "1.4"), policy=policy).accepted
    assert compare("g", sim("a100", "1.2"), sim("a100", "1.3"), policy=policy).mismatches
    assert compare("g", sim("h100", "1.2"), sim("h100", "1.4"), policy=policy).mismatches


def test_a_rule_says_what_it_accepts() -> None:
    with pytest.raises(ValidationError, match="give values"):
        CompatRule(backend="simulated", field="firmware")
    with pytest.raises(ValidationError, match=r"min '2\.0' is above max '1\.9'"):
        CompatRule(backend="simulated", field="firmware", min="2.0", max="1.9")
    policy = CompatSettings(
        rules=[
            CompatRule(backend="simulated", field="firmware", values=["1"]),
            CompatRule(backend="nosuch", field="firmware", values=["1"]),
            CompatRule(backend="simulated", field="colour", values=["1"]),
        ]
    )
    problems = rule_problems(policy, {"simulated": ("firmware", "model")})
    assert [p.path for p in problems] == ["compat.rules[1].backend", "compat.rules[2].field"]
    rule = CompatRule(backend="simulated", field="migration", values=["STOP_COPY"])
    migration = CompatSettings(rules=[rule])
    (problem,) = rule_problems(migration, {"simulated": ("firmware", "migration")})
    assert problem.path == "compat.rules[0].field" and "never by rules" in problem.message
    assert "simulated devices report no field 'colour' (they report firmware, model)" in str(
        problems[1]
    )


def test_an_identity_crosses_the_wire_and_a_malformed_one_is_refused() -> None:
    identity = sim()
    assert Identity.from_json(identity.as_json()) == identity
    for bad in (None, {"backend": "x", "model": 1, "fields": {}}, {"backend": "x", "model": "m"}):
        with pytest.raises(TypeError):
            Identity.from_json(bad)
    with pytest.raises(TypeError, match="identity field 'x'"):
        Identity.from_json({"backend": "b", "model": "m", "fields": {"x": 1.5}})


# -- plans and settings --------------------------------------------------------------------


def test_accept_differences_naming_an_unknown_field_is_a_plan_error() -> None:
    device = sim_device("gpu0")
    make_resolved([{**device, "accept_differences": ["firmware", "model"]}])
    with pytest.raises(PlanError) as caught:
        make_resolved([{**device, "accept_differences": ["firmware", "colour", "migration"]}])
    problems = caught.value.problems
    assert [p.path for p in problems] == [
        "devices[0].accept_differences[1]",
        "devices[0].accept_differences[2]",
    ]
    assert "unknown identity field 'colour' for simulated devices (they have firmware, model)" in (
        problems[0].message
    )
    assert "cannot be accepted as a difference" in problems[1].message


def test_the_settings_compat_table_is_validated_with_paths(tmp_path: Path) -> None:
    config = tmp_path / "o.toml"
    config.write_text(
        '[[compat.rules]]\nbackend = "simulated"\nfield = "firmware"\nmin = "1.2"\n'
        '[[compat.rules]]\nbackend = "vfio"\nfield = "driver_version"\nvalues = ["535.54"]\n'
    )
    settings = Settings.load(config)
    assert [r.field for r in settings.compat.rules] == ["firmware", "driver_version"]
    config.write_text('[[compat.rules]]\nbackend = "vfio"\nfield = "firmware"\nmin = "1"\n')
    with pytest.raises(SettingsError) as caught:
        Settings.load(config)
    assert [p.path for p in caught.value.problems] == ["compat.rules[0].field"]
    config.write_text('[[compat.rules]]\nbackend = "vfio"\nfield = "revision"\n')
    with pytest.raises(SettingsError) as caught:
        Settings.load(config)
    assert caught.value.problems[0].path == "compat.rules[0]"


# -- one host ----------------------------------------------------------------------------------


def moved(m: Migration) -> list[Any]:
    """Every arc the migration asked of a device (none: nothing changed)."""
    return [e for e in m.trace if e.to_state is not None]


async def test_a_firmware_difference_is_refused_before_any_device_moves() -> None:
    device = sim_device("gpu0", firmware="1.2", destination={"firmware": "1.3"})
    m = Migration(make_resolved([sim_device("nic0"), device]))
    report = await m.run()
    assert report.outcome == "refused"
    assert report.error is not None
    assert report.error.kind == "identity_mismatch" and report.error.device == "gpu0"
    assert "device 'gpu0': firmware differs: source '1.2', destination '1.3'" in (
        report.error.message
    )
    assert moved(m) == []
    assert {(d.source_state, d.destination_state) for d in report.devices} == {
        ("RUNNING", "RUNNING")
    }
    assert report.compatibility is not None and report.compatibility.checked
    assert report.compatibility.mismatches == [
        "device 'gpu0': firmware differs: source '1.2', destination '1.3'"
    ]
    ids = report.compatibility.identities["gpu0"]
    assert ids["source"]["fields"]["firmware"] == "1.2"
    assert ids["destination"]["fields"]["firmware"] == "1.3"


async def test_the_destination_inherits_model_and_firmware() -> None:
    m = Migration(make_resolved([sim_device("gpu0", model="h100", firmware="7")]))
    report = await m.run()
    assert report.outcome == "succeeded", report.error
    assert report.compatibility is not None
    assert report.compatibility.identities["gpu0"]["destination"]["model"] == "h100"


async def test_accept_differences_and_compat_rules_let_it_through_and_say_so() -> None:
    device = sim_device("gpu0", firmware="1.2", destination={"firmware": "1.3"})
    m = Migration(make_resolved([{**device, "accept_differences": ["firmware"]}]))
    report = await m.run()
    assert report.outcome == "succeeded", report.error
    assert report.compatibility is not None
    assert [a["by"] for a in report.compatibility.accepted] == ["the plan's accept_differences"]

    policy = rule(min="1.2", max="1.4")
    report = await Migration(make_resolved([device]), compat=policy).run()
    assert report.outcome == "succeeded", report.error
    assert report.compatibility is not None
    (accepted,) = report.compatibility.accepted
    assert accepted["by"].startswith("compat.rules[0]")
    (in_force,) = report.compatibility.policy
    assert in_force == {
        "backend": "simulated",
        "field": "firmware",
        "min": "1.2",
        "max": "1.4",
        "downgrade": False,
    }
    # The other way is a downgrade the rule does not allow.
    back = sim_device("gpu0", firmware="1.3", destination={"firmware": "1.2"})
    report = await Migration(make_resolved([back]), compat=policy).run()
    assert report.outcome == "refused"


def test_run_exits_4_naming_the_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "p.toml"
    plan.write_text(
        'vm = "vm1"\ndowntime_limit_ms = 500\n[[devices]]\nname = "gpu0"\n'
        'backend = "simulated"\nsource = { state_mib = 0.0625, model = "h100" }\n'
        'destination = { model = "h200" }\n'
    )
    assert cli.main(["run", str(plan)]) == cli.ExitStatus.REFUSED
    assert int(cli.ExitStatus.REFUSED) == 4
    out = capsys.readouterr().out
    assert "refused" in out
    assert "device 'gpu0': model differs: source 'h100', destination 'h200'" in out


# -- through the API, on one host and between two ---------------------------------------------


def ended(status: dict[str, Any]) -> bool:
    return status.get("outcome") is not None


async def test_the_api_answers_201_and_the_migration_ends_refused(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file) as (a, _):
        device = sim_device("gpu0", firmware="1.2", destination={"firmware": "1.3"})
        plan = {"vm": "vm-x", "downtime_limit_ms": 500, "devices": [device]}
        migration_id = await a.submit(plan)  # 201
        status = await until(lambda: a.status(migration_id), ended)
        report = status["report"]
        assert status["outcome"] == "refused", report
        assert report["error"]["kind"] == "identity_mismatch"
        assert "source '1.2', destination '1.3'" in report["error"]["message"]


async def test_between_two_hosts_the_destination_reports_its_identities(
    short_dir: Path, token_file: Path
) -> None:
    async with two_daemons(short_dir, token_file) as (a, b):
        plan = cross_plan(b, token_file, "gpu0", model="h100", firmware="1.2")
        plan["devices"][0]["destination"] = {"firmware": "1.3"}
        migration_id = await a.submit(plan)
        status = await until(lambda: a.status(migration_id), ended)
        report = status["report"]
        assert status["outcome"] == "refused", report
        assert (
            "device 'gpu0': firmware differs: source '1.2', destination '1.3'"
            in (report["error"]["message"])
        )
        assert {(d["source_state"], d["destination_state"]) for d in report["devices"]} == {
            ("RUNNING", "RUNNING")
        }
        far = await until(lambda: b.incoming(migration_id), ended)
        assert far["outcome"] == "refused"
        assert far["devices"]["gpu0"]["state"] == "RUNNING"
        assert far["devices"]["gpu0"]["reset"] is False
        assert far["devices"]["gpu0"]["bytes"] == 0
        # The journal holds the report, the identities in it.
        again = await a.status(migration_id)
        assert again["report"]["compatibility"]["identities"]["gpu0"]["destination"]["model"] == (
            "h100"
        )

        # The source daemon's [compat] accepts the upgrade: it migrates, and says so.
        a.service.compat = rule(min="1.0", max="1.9")
        migration_id = await a.submit(plan)
        status = await until(lambda: a.status(migration_id), ended)
        assert status["outcome"] == "succeeded", status["report"]
        compatibility = status["report"]["compatibility"]
        assert compatibility["accepted"][0]["by"].startswith("compat.rules[0]")
        assert compatibility["policy"][0]["min"] == "1.0"


async def test_a_destination_before_identities_is_not_compared_and_says_so(
    short_dir: Path, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.peer import registry

    async with two_daemons(short_dir, token_file) as (a, b):
        monkeypatch.setattr(registry, "PROTOCOL_VERSIONS", (1, 2))
        plan = cross_plan(b, token_file, "gpu0")
        migration_id = await a.submit(plan)
        status = await until(lambda: a.status(migration_id), ended)
        report = status["report"]
        assert status["outcome"] == "succeeded", report
        assert report["compatibility"]["checked"] is False
        assert any("identities were not compared" in note for note in report["notes"])


async def test_a_destination_that_reports_no_identity_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A null in a peer's prepare answer (a bug, or a hostile peer) proves no match."""
    from orchestrator.engine.devices import DeviceDriver
    from orchestrator.states import Side

    real = DeviceDriver.identity

    async def none_on_the_destination(self: DeviceDriver, side: Side, name: str) -> Any:
        return None if side is Side.DESTINATION else await real(self, side, name)

    monkeypatch.setattr(DeviceDriver, "identity", none_on_the_destination)
    m = Migration(make_resolved([sim_device("gpu0")]))
    report = await m.run()
    assert report.outcome == "refused"
    assert report.error is not None and "the destination reported none" in report.error.message
    assert not [e for e in m.trace if e.kind == "arc_begin"]
