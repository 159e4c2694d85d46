"""The pure core stays pure: no trio, no backend, no runner behind its imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = ["orchestrator.states", "orchestrator.flow", "orchestrator.plan", "orchestrator.errors"]
FORBIDDEN = ("trio", "orchestrator.backends", "orchestrator.runner", "orchestrator.transport")


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    # A fresh interpreter: this test process has imported everything already.
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


def test_backend_errors_become_failures_only_in_the_runner() -> None:
    # DeviceFailure is the runner's own wrapper; nothing else may raise it.
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "orchestrator"
    users = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "DeviceFailure" in p.read_text() and p.name != "runner.py"
    )
    assert users == []
