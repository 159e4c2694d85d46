from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import Phase, settings

from orchestrator import logs


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    # Tests that look at events capture them with structlog.testing.capture_logs.
    logs.configure("warning")


# A profile for debugging a failure without waiting for the shrinker.
settings.register_profile("noshrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])


#: The bearer token of the daemon tests' token file.
TOKEN = "daemon-test-token-0123456789abcdef-42"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="orch-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def token_file(short_dir: Path) -> Path:
    path = short_dir / "tokens"
    path.write_text(f"# test tokens\n{TOKEN}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def _unfreeze_the_collector() -> Iterator[None]:
    """A daemon started in this process freezes what exists (``gc.freeze``):
    objects of earlier tests among them.  Hand them back to the collector."""
    yield
    gc.unfreeze()
