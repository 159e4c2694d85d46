"""The kernel-lab suite: tests that run inside the lab's guest kernel.

``scripts/kernel-lab.sh test`` boots the lab kernel once and runs
``pytest tests/kernel --lab-guest`` in it, as root, with the mtty sample
driver built for it.  Anywhere else (the host's normal ``pytest`` run) every
test here is collected and skipped, with the reason shown.

``--lab-guest`` on a machine that is not the lab guest is refused: these
tests load kernel modules and create devices, which must never happen on
a developer's host by accident.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.lab import Lab, Mdevs
from tests.kernel.vdpa_vmm import VdpaDevices, load_vdpa_modules

HERE = Path(__file__).resolve().parent
SKIP_REASON = "runs inside the kernel lab guest: scripts/kernel-lab.sh test"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--lab-guest",
        action="store_true",
        default=False,
        help="run tests/kernel: only inside the kernel lab's guest (scripts/kernel-lab.sh test)",
    )


def _in_guest(config: pytest.Config) -> bool:
    # Registered late (the host run does not name tests/kernel), the option keeps its default.
    return bool(config.getoption("--lab-guest", default=False))


def pytest_configure(config: pytest.Config) -> None:
    if not _in_guest(config):
        return
    lab = os.environ.get("ORCHESTRATOR_KERNEL_LAB")
    kernel = os.environ.get("ORCHESTRATOR_LAB_KERNEL")
    problems = []
    if not lab or not kernel:
        problems.append("ORCHESTRATOR_KERNEL_LAB and ORCHESTRATOR_LAB_KERNEL are not set")
    elif platform.release() != kernel:
        problems.append(f"this kernel is {platform.release()}, the lab's is {kernel}")
    if os.geteuid() != 0:
        problems.append("not root")
    if problems:
        raise pytest.UsageError(
            "--lab-guest is for the kernel lab's guest only (scripts/kernel-lab.sh test): "
            + "; ".join(problems)
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _in_guest(config):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab() -> Lab:
    """The guest with vfio, the type1 IOMMU, mdev and mtty loaded."""
    root = os.environ.get("ORCHESTRATOR_KERNEL_LAB")
    assert root, "the lab fixture runs only in the guest"
    lab = Lab(Path(root))
    lab.load_modules()
    return lab


@pytest.fixture
def mdevs(lab: Lab) -> Iterator[Mdevs]:
    """Creates mtty devices for one test and removes them after it."""
    made = Mdevs(lab)
    try:
        yield made
    finally:
        made.remove_all()


@pytest.fixture(scope="session")
def vdpa_lab() -> Path:
    """The guest with vhost_vdpa, vduse and the lab's vdpa_sim_net loaded."""
    root = os.environ.get("ORCHESTRATOR_KERNEL_LAB")
    assert root, "the vdpa_lab fixture runs only in the guest"
    if shutil.which("vdpa") is None:
        pytest.skip("the vdpa tool (iproute2) is missing: it creates the vDPA devices")
    load_vdpa_modules(Path(root))
    return Path(root)


@pytest.fixture
def vdpa_devices(vdpa_lab: Path) -> Iterator[VdpaDevices]:
    """Creates vDPA devices for one test and deletes them after it."""
    made = VdpaDevices()
    try:
        yield made
    finally:
        made.remove_all()
