"""The pure core stays pure: no trio, no backend, no runner behind its imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = ["orchestrator.states", "orchestrator.flow", "orchestrator.plan", "orchestrator.errors"]
FORBIDDEN = (
    "trio",
    "orchestrator.backends",
    "orchestrator.runner",
    "orchestrator.transport",
    "orchestrator.api",
    "orchestrator.service",
)


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
    # Backends raise DeviceError; only the runner catches it and turns it into
    # a migration failure.  Anywhere else, catching it would hide a device's
    # answer from the flow's rollback.
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "orchestrator"
    catchers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                if names & {"DeviceError", "DeviceTimeout"}:
                    catchers.add(str(path.relative_to(root)))
    # incoming.py is the runner's destination half on the destination host of a
    # migration between two hosts: it reports each device's answer to the
    # source's runner, which alone decides what the failure means.
    runners = {"runner.py", "incoming.py"}
    allowed = runners | {str(p.relative_to(root)) for p in (root / "backends").rglob("*.py")}
    assert catchers, "the runner catches device errors"
    assert catchers <= allowed, catchers - allowed


def test_wire_protocol_is_sans_io() -> None:
    # The data channel's wire protocol lives beside its trio driver, in a
    # package whose __init__ imports trio, so the fresh-interpreter check
    # above cannot apply to it: check its own imports instead.
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "orchestrator" / "transport" / "wire.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    io = {"trio", "socket", "select", "selectors", "asyncio", "threading", "os"}
    bad = {m for m in imported if m.split(".")[0] in io}
    bad |= {m for m in imported if m.startswith("orchestrator") and m != "orchestrator.errors"}
    assert imported, "the check parsed the module"
    assert not bad, f"the wire protocol imports {sorted(bad)}"
