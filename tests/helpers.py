"""Plan builders shared by the tests."""

from __future__ import annotations

from typing import Any

from orchestrator.plan import Plan, parse_plan
from orchestrator.resolve import ResolvedPlan, resolve


def sim_device(
    name: str, *, destination: dict[str, Any] | None = None, **source: Any
) -> dict[str, Any]:
    """A simulated device entry; keyword arguments are source parameters."""
    return {
        "name": name,
        "backend": "simulated",
        "source": {"state_mib": 0.0625, **source},
        "destination": destination or {},
    }


def make_plan(devices: list[dict[str, Any]], **top: Any) -> Plan:
    data: dict[str, Any] = {"vm": "vm-test", "downtime_limit_ms": 500, **top, "devices": devices}
    return parse_plan(data)


def make_resolved(devices: list[dict[str, Any]], **top: Any) -> ResolvedPlan:
    return resolve(make_plan(devices, **top))
