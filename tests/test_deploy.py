"""The deployment files in deploy/ agree with the daemon they deploy.

* the Grafana dashboard and the Prometheus rules only query series that
  ``orchestrator.metrics.Metrics`` exports, and group or match only on labels
  those series carry;
* the rules pass ``promtool check rules``;
* the systemd unit passes ``systemd-analyze verify`` and keeps its hardening.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.metrics import Metrics
from orchestrator.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "orchestrator.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
UNIT = DEPLOY / "systemd" / "orchestrator.service"

#: Labels Prometheus attaches to every scraped series (target labels).
TARGET_LABELS = frozenset({"instance", "job"})

_METRIC = re.compile(r"\b(orchestrator_[A-Za-z0-9_]+)")
_SELECTOR = re.compile(r"\b(orchestrator_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def exported() -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> the values it takes, as a fresh Metrics exposes them.

    Sample names are what PromQL selects (``..._bucket``, ``..._total``, ...), so
    a query's identifiers are checked as they are, with no suffix stripping.
    """
    registry = CollectorRegistry()
    Metrics(registry)
    text = generate_latest(registry).decode()
    samples: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return samples


@pytest.fixture(scope="module")
def samples() -> dict[str, dict[str, set[str]]]:
    return exported()


def check_expr(expr: str, samples: dict[str, dict[str, set[str]]]) -> list[str]:
    """Every problem of one PromQL expression against the exported samples."""
    problems: list[str] = []
    names = set(_METRIC.findall(expr))
    if not names:
        problems.append(f"no orchestrator metric in {expr!r}")
    for name in sorted(names):
        if name not in samples:
            problems.append(f"{name} is not exported (in {expr!r})")
    # A grouping label must be on every series the expression names.
    for group in _GROUPING.findall(expr):
        for label in (x.strip() for x in group.split(",")):
            if not label or label in TARGET_LABELS:
                continue
            for name in sorted(n for n in names if n in samples):
                if label not in samples[name]:
                    problems.append(f"{name} has no label {label!r} (in {expr!r})")
    # A matcher's label must exist and an equality matcher's value must be one
    # the metric exports (every known label value exists from the start).
    for name, body in _SELECTOR.findall(expr):
        if name not in samples:
            continue
        for label, op, value in _MATCHER.findall(body):
            if label in TARGET_LABELS:
                continue
            if label not in samples[name]:
                problems.append(f"{name} has no label {label!r} (in {expr!r})")
            elif op == "=" and value not in samples[name][label]:
                problems.append(f"{name} never has {label}={value!r} (in {expr!r})")
    return problems


def test_helper_catches_unknown_metrics_and_labels(
    samples: dict[str, dict[str, set[str]]],
) -> None:
    assert check_expr("sum by (outcome) (rate(orchestrator_migrations_total[5m]))", samples) == []
    assert check_expr("rate(orchestrator_nope_total[5m])", samples)
    assert check_expr("rate(orchestrator_migrations[5m])", samples)  # family, not sample
    assert check_expr("sum by (phase) (rate(orchestrator_migrations_total[5m]))", samples)
    assert check_expr('orchestrator_migrations_total{outcome="lost"}', samples)
    assert check_expr('orchestrator_migrations_total{outcom="failed"}', samples)


# -- Grafana -------------------------------------------------------------------


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # rows


def test_dashboard_is_valid_json_with_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = list(_panels(dashboard))
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_covers_the_metrics_asked_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    for q in ("0.5", "0.9", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le) "
            "(rate(orchestrator_migration_downtime_seconds_bucket"
        ) in exprs
    for name in (
        "orchestrator_migrations_total",
        "orchestrator_migrations_active",
        "orchestrator_migration_phase_seconds_bucket",
        "orchestrator_device_bytes_total",
        "orchestrator_barrier_wait_seconds_bucket",
        "orchestrator_device_errors_total",
        "orchestrator_device_transition_seconds_bucket",
    ):
        assert name in exprs


def test_dashboard_queries_only_exported_metrics_and_labels(
    samples: dict[str, dict[str, set[str]]],
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    problems = [
        problem
        for panel in _panels(dashboard)
        for target in panel["targets"]
        for problem in check_expr(target["expr"], samples)
    ]
    assert problems == []


# -- Prometheus rules ----------------------------------------------------------


def _rule_exprs(text: str) -> list[str]:
    """The ``expr:`` of every rule, one-line or block scalar (no YAML library needed)."""
    exprs: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if match is None:
            continue
        indent, rest = len(match.group(1)), match.group(2).strip()
        if rest not in ("|", ">", "|-", ">-"):
            exprs.append(rest)
            continue
        block: list[str] = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        exprs.append(" ".join(x for x in block if x))
    return exprs


def test_promtool_check_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_query_only_exported_metrics_and_labels(
    samples: dict[str, dict[str, set[str]]],
) -> None:
    text = ALERTS.read_text()
    exprs = _rule_exprs(text)
    assert len(exprs) == text.count("- alert:") >= 4
    problems = [problem for expr in exprs for problem in check_expr(expr, samples)]
    assert problems == []
    joined = " ".join(exprs)
    assert "orchestrator_migration_downtime_seconds_bucket" in joined
    assert 'orchestrator_migrations_total{outcome="failed"}' in joined
    assert "orchestrator_migrations_active" in joined
    assert "orchestrator_device_errors_total" in joined


# -- systemd -------------------------------------------------------------------


def _unit() -> configparser.RawConfigParser:
    """The unit parsed, repeated keys (DeviceAllow=) kept as newline-joined values."""

    class MultiDict(dict[str, Any]):
        def __setitem__(self, key: str, value: Any) -> None:
            if key in self and isinstance(value, list):
                super().__getitem__(key).extend(value)
            else:
                super().__setitem__(key, value)

    parser = configparser.RawConfigParser(
        strict=False,
        dict_type=MultiDict,
        empty_lines_in_values=False,
        interpolation=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_keeps_its_settings_and_hardening() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "simple"
    assert service["ExecStart"] == (
        "/usr/bin/orchestrator serve --config /etc/orchestrator/orchestrator.toml"
    )
    expected = {
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "StateDirectory": "orchestrator",
        "RuntimeDirectory": "orchestrator",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "DevicePolicy": "closed",
        "LockPersonality": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "ReadWritePaths": "/var/lib/orchestrator",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert "PrivateDevices" not in service  # it would hide /dev/vfio
    device_allow = service["DeviceAllow"].splitlines()
    assert device_allow == [
        "/dev/vfio/vfio rw",
        "char-vfio rw",
        "char-vhost-vdpa rw",
    ]
    timeout = re.fullmatch(r"(\d+)s?", service["TimeoutStopSec"])
    assert timeout is not None
    grace = Settings.model_fields["shutdown_grace_s"].default
    assert int(timeout.group(1)) >= grace + 30


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    script = Path(sys.executable).parent / "orchestrator"
    if not script.exists():
        pytest.skip(f"no orchestrator script beside {sys.executable}")
    unit = tmp_path / "orchestrator.service"
    unit.write_text(
        UNIT.read_text().replace("ExecStart=/usr/bin/orchestrator", f"ExecStart={script}")
    )
    try:
        result = subprocess.run(
            [analyze, "verify", "--man=no", str(unit)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"systemd-analyze cannot run here: {error}")
    output = result.stdout + result.stderr
    # systemd-analyze only warns (exit 0) on unknown keys and bad values: any
    # line about the unit file is a problem.
    about_unit = [line for line in output.splitlines() if str(unit) in line]
    if result.returncode != 0 and not about_unit:
        pytest.skip(f"systemd-analyze cannot run here: {output.strip()}")
    assert result.returncode == 0 and about_unit == [], output
