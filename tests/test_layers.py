"""The pure core stays pure: no trio, no backend, no runner behind its imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "orchestrator.convergence",
    "orchestrator.states",
    "orchestrator.compat",
    "orchestrator.flow",
    "orchestrator.plan",
    "orchestrator.errors",
    "orchestrator.peer.messages",
    "orchestrator.peer.protocol",
]
FORBIDDEN = (
    "trio",
    "orchestrator.backends",
    "orchestrator.engine",
    "orchestrator.peer.remote",
    "orchestrator.peer.server",
    "orchestrator.peer.registry",
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
    # The engine's device driver is the one place, on both halves of a
    # migration and on either host: every other part sees DeviceFailure.
    runners = {"engine/devices.py"}
    backends = {str(p.relative_to(root)) for p in (root / "backends").rglob("*.py")}
    allowed = runners | backends
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


def _orchestrator_imports(relative: str) -> set[str]:
    """The orchestrator modules a module imports (at any level of its code)."""
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "orchestrator" / relative
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orch"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("orchestrator")}
    return found


def test_the_report_is_a_model_and_nothing_else() -> None:
    # The report is the contract of run --json and the API: plain data, which the
    # engine fills in and everything else reads.
    assert _orchestrator_imports("report.py") == set()
    test_pure_module_imports_no_io("orchestrator.report")


def test_resolve_knows_plans_backends_and_handles_but_never_runs_anything() -> None:
    # Resolving checks a plan against the backends (their parameters, their static
    # capabilities) and the handles VMMs lent: it opens no device and runs no
    # migration, so the API, the engine and the transport are out of its reach.
    allowed = {
        "orchestrator.backends",
        "orchestrator.backends.handles",
        "orchestrator.compat",
        "orchestrator.errors",
        "orchestrator.flow",
        "orchestrator.handover",
        "orchestrator.plan",
        "orchestrator.states",
    }
    imported = _orchestrator_imports("resolve.py")
    assert imported, "the check parsed the module"
    assert imported <= allowed, imported - allowed
