"""A VFIO device as a plan names it, and where it is on this host.

A plan's ``source`` and ``destination`` tables name a device by exactly one of
``mdev`` (a UUID), ``pci`` (an address), ``sysfs`` (a path) or ``handle`` (a
device a VMM handed over): :class:`VfioParams`.  :func:`locate` finds it under
``/sys`` (its directory, symlinks resolved, which is its host-wide identity;
its IOMMU group or VFIO cdev) or says, naming the field, why it is not there.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.backends.handles import check_handle

__all__ = ["DeviceLocation", "LocateError", "VfioParams", "locate"]

_PCI_ADDRESS = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")
_SYSFS_PATH = re.compile(r"^/sys/(?:bus/[^/]+/devices/[^/]+|devices/.+)$")


# --- plan parameters ---------------------------------------------------------------------


class VfioParams(BaseModel):
    """One VFIO device endpoint, as a plan's ``source`` or ``destination`` table names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mdev: str | None = Field(
        default=None,
        description="UUID of a mediated device (/sys/bus/mdev/devices/<uuid>).",
    )
    pci: str | None = Field(
        default=None,
        description="PCI address domain:bus:device.function of a function bound to vfio-pci "
        "or a vendor variant driver, for example 0000:3b:00.1 (the domain defaults to 0000).",
    )
    sysfs: str | None = Field(
        default=None,
        description="The device's sysfs path: /sys/bus/<bus>/devices/<name> or /sys/devices/...",
    )
    handle: str | None = Field(
        default=None,
        description="A device a VMM handed over to the daemon's handover socket, as "
        "'<vm>/<device>' (only through the daemon: `orchestrator serve`).",
    )
    iommufd: Literal["auto", "never", "require"] = Field(
        default="auto",
        description="Open the device through its VFIO cdev and iommufd: auto when the kernel "
        "offers the cdev, never (always the IOMMU group and a type1v2 container), or require.  "
        "Ignored for a handle: the VMM opened that device.",
    )

    @field_validator("mdev")
    @classmethod
    def _canonical_uuid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(uuid.UUID(value.strip()))
        except ValueError:
            raise ValueError(f"{value!r} is not a UUID") from None

    @field_validator("pci")
    @classmethod
    def _canonical_pci(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _PCI_ADDRESS.match(value.strip().lower())
        if match is None:
            raise ValueError(
                f"{value!r} is not a PCI address (domain:bus:device.function, "
                "for example 0000:3b:00.1)"
            )
        domain, bus, slot, function = match.groups()
        return f"{domain or '0000'}:{bus}:{slot}.{function}"

    @field_validator("sysfs")
    @classmethod
    def _sysfs_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = value.rstrip("/")
        if not _SYSFS_PATH.match(path) or "/../" in f"{path}/" or "/./" in f"{path}/":
            raise ValueError(
                f"{value!r} is not a device's sysfs path "
                "(/sys/bus/<bus>/devices/<name> or /sys/devices/...)"
            )
        return path

    _handle = field_validator("handle")(check_handle)

    @model_validator(mode="after")
    def _one_address(self) -> VfioParams:
        given = [name for name in _ADDRESS_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            which = " and ".join(given) if given else "none"
            raise ValueError(
                f"name the device by exactly one of mdev, pci, sysfs or handle (got {which})"
            )
        return self

    @property
    def address_field(self) -> str:
        """The field that names the device."""
        return next(name for name in _ADDRESS_FIELDS if getattr(self, name) is not None)

    @property
    def address(self) -> str:
        """How messages name the device before it is found: ``"mdev <uuid>"`` and the like."""
        field_name = self.address_field
        return f"{field_name} {getattr(self, field_name)}"


_ADDRESS_FIELDS = ("mdev", "pci", "sysfs", "handle")


# --- finding a device in sysfs --------------------------------------------------------------


@dataclass(frozen=True)
class DeviceLocation:
    """Where a device is: its sysfs directory and what opening it needs."""

    #: The device's sysfs directory, symlinks resolved: its host-wide identity.
    sysfs: Path
    #: The name VFIO_GROUP_GET_DEVICE_FD wants (the directory's name).
    name: str
    #: How messages name it: "mdev <uuid>", "PCI 0000:3b:00.1" or the sysfs path.
    identity: str
    #: Its IOMMU group number, if it has one.
    group: int | None
    #: Its VFIO cdev (``vfioN``), if the kernel made one.
    cdev: str | None


class LocateError(Exception):
    """A device a plan names is not where it says, or is not a VFIO device."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


def _host_path(sysfs_root: Path, path: str) -> Path:
    """``/sys/...`` under ``sysfs_root`` (which is ``/sys`` except in tests)."""
    return sysfs_root.joinpath(*Path(path).parts[2:])


def _model_of(sysfs: Path) -> str | None:
    """A device's model for the arc history: its mdev type (what tells mdevs
    apart), else its PCI vendor and device IDs and the driver bound to it."""
    try:
        mdev_type = sysfs / "mdev_type"
        if mdev_type.exists():
            return f"vfio/mdev:{mdev_type.resolve().name}"
        vendor = (sysfs / "vendor").read_text().strip()
        device = (sysfs / "device").read_text().strip()
        driver = (sysfs / "driver").resolve().name if (sysfs / "driver").exists() else "-"
    except OSError:
        return None
    return f"vfio/pci:{vendor}:{device}:{driver}"


def locate(params: VfioParams, sysfs_root: Path = Path("/sys")) -> DeviceLocation:
    """Find the device ``params`` names; LocateError naming the field if it is not there.

    A handle names no place in sysfs: the VMM that handed the device over knows it,
    the daemon only holds its descriptor (a ValueError: callers check first).
    """
    where = params.address_field
    if params.handle is not None:
        raise ValueError(f"{params.address} is handed over, not found in sysfs")
    if params.mdev is not None:
        identity = f"mdev {params.mdev}"
        link = sysfs_root / "bus" / "mdev" / "devices" / params.mdev
        if not link.exists():
            raise LocateError(
                where,
                f"no mediated device {params.mdev} (nothing at /sys/bus/mdev/devices/"
                f"{params.mdev}); create it by writing its UUID to "
                "/sys/class/mdev_bus/<parent>/mdev_supported_types/<type>/create",
            )
    elif params.pci is not None:
        identity = f"PCI {params.pci}"
        link = sysfs_root / "bus" / "pci" / "devices" / params.pci
        if not link.exists():
            raise LocateError(
                where, f"no PCI device {params.pci} (nothing at /sys/bus/pci/devices/{params.pci})"
            )
        driver = link / "driver"
        if not driver.exists():
            raise LocateError(
                where,
                f"PCI device {params.pci} is bound to no driver; bind it to vfio-pci "
                "(or its vendor's vfio-pci variant, which migration needs)",
            )
        driver_name = driver.resolve().name
        if "vfio" not in driver_name:
            raise LocateError(
                where,
                f"PCI device {params.pci} is bound to {driver_name}, not to a VFIO driver; "
                "bind it to its vendor's vfio-pci variant driver (migration needs one)",
            )
    else:
        assert params.sysfs is not None
        identity = params.sysfs
        link = _host_path(sysfs_root, params.sysfs)
        if not link.is_dir():
            raise LocateError(where, f"no device at {params.sysfs}")
    device_dir = link.resolve()
    group = None
    group_link = device_dir / "iommu_group"
    if group_link.exists():
        try:
            group = int(group_link.resolve().name)
        except ValueError:
            raise LocateError(
                where, f"{identity}: iommu_group points to {group_link.resolve()}, not a group"
            ) from None
    cdev = None
    vfio_dev = device_dir / "vfio-dev"
    if vfio_dev.is_dir():
        names = sorted(p.name for p in vfio_dev.iterdir() if p.name.startswith("vfio"))
        cdev = names[0] if names else None
    if group is None and cdev is None:
        raise LocateError(
            where,
            f"{identity} has no IOMMU group and no VFIO cdev: it is not bound to a VFIO "
            "driver (or the IOMMU is off)",
        )
    return DeviceLocation(
        sysfs=device_dir, name=device_dir.name, identity=identity, group=group, cdev=cdev
    )
