"""The dashboard and the alert rules against a real Prometheus scraping a real daemon.

Debian's ``prometheus`` package (CI installs it for promtool) brings the server:
it scrapes an in-process daemon's ``/metrics`` over TCP with the API token, as a
fleet's Prometheus would, while two migrations run; then every dashboard query,
with Grafana's macros substituted, and every alert expression must evaluate,
and the panels a fleet watches must show numbers, not NaN or nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import TOKEN
from tests.test_daemon import plan_body, running_daemon, settings_for, unix_client, wait_outcome
from tests.test_deploy import ALERTS, DASHBOARD, _panels, _rule_exprs
from tests.two_daemons import free_port

#: Grafana's macros and the dashboard's variables, as a user would pick them.
MACROS = {
    "$__rate_interval": "4s",
    "$window": "1h",
    "$instance": ".*",
    "$node": ".*",
}


def substitute(expr: str) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return expr


@asynccontextmanager
async def prometheus(tmp: Path, target: str) -> AsyncIterator[httpx.AsyncClient]:
    """A Prometheus server scraping ``target`` every second; its HTTP API's client."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus): cannot scrape")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "orchestrator",
                "authorization": {"credentials_file": str(tmp / "token")},
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config))
    # Prometheus sends the file as it is: one token, without its line's end.
    credentials = tmp / "token"
    credentials.write_text(TOKEN)
    credentials.chmod(0o600)
    port = free_port()
    process = await trio.lowlevel.open_process(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("wb"),
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        process.terminate()
        with trio.move_on_after(20):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def query(client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def until_value(client: httpx.AsyncClient, expr: str, wanted: float) -> None:
    """Wait until ``expr`` evaluates to ``wanted`` (the deadline only bounds a hang)."""
    with trio.move_on_after(60):
        while True:
            try:
                result = await query(client, expr)
            except httpx.TransportError:  # not listening yet
                result = []
            if result and float(result[0]["value"][1]) == wanted:
                return
            await trio.sleep(0.2)
    targets = (await client.get("/api/v1/targets")).json()["data"]["activeTargets"]
    raise AssertionError(f"{expr} never became {wanted}: {[t['lastError'] for t in targets]}")


def numbers(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result if not math.isnan(float(r["value"][1]))]


async def test_the_dashboard_and_alerts_work_against_a_real_prometheus(
    short_dir: Path, token_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODE_NAME", "node-a")
    settings = settings_for(short_dir, token_file, tcp="127.0.0.1:0")
    async with running_daemon(settings) as d:
        assert d.running.tcp_address is not None
        host, port = d.running.tcp_address
        async with prometheus(tmp_path, f"{host}:{port}") as prom:
            await until_value(prom, 'up{job="orchestrator"}', 1)
            async with unix_client(short_dir / "api.sock") as api:
                for done, vm in enumerate(("vm-1", "vm-2"), start=1):
                    response = await api.post("/v1/migrations", json=plan_body(vm, f"gpu-{vm}"))
                    assert response.status_code == 201, response.text
                    status = await wait_outcome(api, response.json()["id"])
                    assert status["outcome"] == "succeeded", status
                    # Scraped before the next: the series the first one created
                    # (labelled histograms) then have an increase to show.
                    succeeded = 'sum(orchestrator_migrations_total{outcome="succeeded"})'
                    await until_value(prom, succeeded, done)
            await until_value(prom, "count(count_over_time(up[1h]) > 3)", 1)

            dashboard = json.loads(DASHBOARD.read_text())
            results = {}
            for panel in _panels(dashboard):
                for target in panel["targets"]:
                    results[(panel["title"], target["refId"])] = await query(
                        prom, substitute(target["expr"])
                    )
            for variable in dashboard["templating"]["list"]:
                if variable["type"] == "query":
                    # label_values(METRIC, LABEL): the series the variable offers.
                    inner = substitute(variable["definition"])[len("label_values(") : -1]
                    selector, label = (x.strip() for x in inner.rsplit(",", 1))
                    found = await query(prom, selector)
                    assert {r["metric"][label] for r in found} == (
                        {"node-a"} if label == "node" else {f"{host}:{port}"}
                    )
            for expr in _rule_exprs(ALERTS.read_text()):
                await query(prom, expr)

    def shown(title_part: str) -> list[float]:
        return [
            v
            for (title, _), result in results.items()
            if title_part in title
            for v in numbers(result)
        ]

    # The panels a fleet watches show numbers between migrations, not NaN.
    downtime = shown("Downtime p50 / p99")
    assert len(downtime) == 2 and all(0 < v < 1 for v in downtime), downtime
    assert shown("Downtime against its limit"), results
    assert shown("Refused, rolled back, failed") == [0, 0, 0]
    assert shown("In flight") == [0]
    assert shown("Daemon: resident memory") and shown("Daemon: open descriptors")
    assert shown("Phase breakdown")
