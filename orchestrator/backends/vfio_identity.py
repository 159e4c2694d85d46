"""What a VFIO device is, for the identity check before a migration (``orchestrator.compat``).

The fields, each where the host tells it:

* ``vendor``, ``device``, ``subsystem_vendor``, ``subsystem_device``,
  ``revision``: the PCI IDs, from the device's sysfs files, else from its
  PCI config space through the device descriptor (an mdev's, or a device
  handed over on a group descriptor, which names no sysfs directory);
* ``mdev_type``: a mediated device's type (the ``mdev_type`` link), which is
  what tells mdevs of one parent apart (``mtty-1`` and ``mtty-2`` load each
  other's state no better than two boards do);
* ``driver``: the driver bound to a PCI function (a vendor's variant driver,
  ``mlx5_vfio_pci``), or for an mdev its parent's, the prefix of its type;
* ``driver_version``: the driver module's ``/sys/module/<module>/version``,
  where the module declares one;
* ``migration``: the migration capability flags (compatibility, not equality:
  the destination must have what the source's route uses).

A handed-over descriptor is traced back to its device through the
``vfio-device-syspath`` of its fdinfo, where the kernel prints one, or as a VFIO
cdev (``/dev/vfio/devices/vfioN``) through ``/sys/class/vfio-dev/vfioN/device``.
A field one end cannot read is not compared (the report lists it).  The identity's
model, which ``[[compat.rules]]`` name, is the mdev type, else ``vendor:device``.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from orchestrator.compat import CAPABILITIES_FIELD, FieldValue, Identity, capability_names
from orchestrator.states import Capabilities

__all__ = [
    "CONFIG_BYTES",
    "IDENTITY_FIELDS",
    "config_fields",
    "sysfs_fields",
    "traced_sysfs",
    "vfio_identity",
]

#: The identity fields of a VFIO device, as plans and ``[[compat.rules]]`` name them.
IDENTITY_FIELDS = (
    "device",
    "driver",
    "driver_version",
    "mdev_type",
    CAPABILITIES_FIELD,
    "revision",
    "subsystem_device",
    "subsystem_vendor",
    "vendor",
)

#: The PCI IDs: the sysfs file, and where they stand in config space (offset, bytes).
_PCI_IDS: dict[str, tuple[int, int]] = {
    "vendor": (0x00, 2),
    "device": (0x02, 2),
    "revision": (0x08, 1),
    "subsystem_vendor": (0x2C, 2),
    "subsystem_device": (0x2E, 2),
}
#: The config space header bytes that hold every ID.
CONFIG_BYTES = 0x30

_CDEV = re.compile(r"^/dev/vfio/devices/(vfio\d+)$")


def _id(value: int, size: int) -> str:
    """An ID as sysfs writes it: ``0x10de``, ``0xa1``."""
    return f"0x{value:0{2 * size}x}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def traced_sysfs(fd_path: str, fd_info: str, sysfs_root: Path) -> Path | None:
    """The sysfs directory of the device a descriptor opens, where it can be told:
    the ``vfio-device-syspath`` its fdinfo gives (kernels that print it), else a
    VFIO cdev's (``/dev/vfio/devices/vfioN``); None for a group's device
    descriptor on an older kernel, or anything else."""
    for line in fd_info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vfio-device-syspath" and value.strip().startswith("/sys/"):
            path = sysfs_root.joinpath(*Path(value.strip()).parts[2:])
            if path.exists():
                return path.resolve()
    found = _CDEV.match(fd_path)
    if found is None:
        return None
    link = sysfs_root / "class" / "vfio-dev" / found.group(1) / "device"
    return link.resolve() if link.exists() else None


def sysfs_fields(device_dir: Path, sysfs_root: Path) -> dict[str, FieldValue]:
    """Every field the device's sysfs directory tells (see the module docstring)."""
    fields: dict[str, FieldValue] = {}
    for name, (_, size) in _PCI_IDS.items():
        text = _read(device_dir / name)
        if text is not None:
            try:
                fields[name] = _id(int(text, 16), size)
            except ValueError:
                fields[name] = text
    module: Path | None = None
    mdev_type = device_dir / "mdev_type"
    if mdev_type.exists():
        type_name = mdev_type.resolve().name
        fields["mdev_type"] = type_name
        # "<parent driver>-<type>", as the kernel names mdev types.
        fields["driver"] = type_name.split("-", 1)[0]
    elif (device_dir / "driver").exists():
        driver = (device_dir / "driver").resolve()
        fields["driver"] = driver.name
        if (driver / "module").exists():
            module = (driver / "module").resolve()
    driver_name = fields.get("driver")
    if module is None and isinstance(driver_name, str):
        module = sysfs_root / "module" / driver_name
    if module is not None and (version := _read(module / "version")) is not None:
        fields["driver_version"] = version
    return fields


def config_fields(config: bytes) -> dict[str, FieldValue]:
    """The PCI IDs from the first ``CONFIG_BYTES`` of the device's config space
    (little-endian, as PCI has it); none from a shorter or all-ones header."""
    if len(config) < CONFIG_BYTES:
        return {}
    fields: dict[str, FieldValue] = {}
    for name, (offset, size) in _PCI_IDS.items():
        value = int.from_bytes(config[offset : offset + size], "little")
        fields[name] = _id(value, size)
    if struct.unpack_from("<H", config, 0)[0] == 0xFFFF:
        return {}  # no device answers there
    return fields


def vfio_identity(fields: dict[str, FieldValue], caps: Capabilities | None) -> Identity:
    """The identity of a VFIO device of these fields and capabilities."""
    if caps is not None:
        fields = {**fields, CAPABILITIES_FIELD: capability_names(caps)}
    mdev_type = fields.get("mdev_type")
    if isinstance(mdev_type, str):
        model = mdev_type
    else:
        model = f"{fields.get('vendor', '?')}:{fields.get('device', '?')}"
    return Identity("vfio", model, fields)
