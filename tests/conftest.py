from __future__ import annotations

import pytest
from hypothesis import Phase, settings

from orchestrator import logs


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    # Tests that look at events capture them with structlog.testing.capture_logs.
    logs.configure("warning")


# A profile for debugging a failure without waiting for the shrinker.
settings.register_profile("noshrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])
