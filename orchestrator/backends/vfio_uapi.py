"""The VFIO and iommufd uAPI as data: ioctl numbers and structure layouts.

What it is for
--------------

``orchestrator.backends.vfio`` drives devices through the kernel's VFIO
interface (``include/uapi/linux/vfio.h``, and ``iommufd.h`` for the cdev
path).  This module is the one place that knows how those ioctls are
numbered and how their argument structures are laid out, so that the layout
can be checked on any host, without a kernel that has VFIO
(``tests/test_vfio.py``), and reused by the kernel-lab tests that poke a
device's registers.  It does no I/O.

Invariants it keeps
-------------------

* ioctl numbers are computed the way the kernel's ``_IOC`` macro computes
  them on x86-64 and arm64 (8 bits of number, 8 of type, 14 of size, 2 of
  direction).  VFIO declares every one of its ioctls with plain ``_IO``
  (no size, no direction) even where the comment above it says ``_IOWR``:
  the argument's size travels in the structure's own ``argsz`` field
  instead, which is how the kernel tells old callers from new ones.
* Every structure is packed with an explicit byte order (native, as the
  kernel's) and no implicit padding: a ``struct.Struct`` format here spells
  each field and each hole, so its size is the C structure's ``sizeof``.
  Fields the kernel declares ``__aligned_u64`` start at multiples of 8.
* A ``VFIO_DEVICE_FEATURE`` call is one buffer: the 8-byte header
  (``argsz``, ``flags``) followed by the feature's own structure;
  ``argsz`` counts both.  The feature index sits in the low 16 bits of
  ``flags``; ``GET``, ``SET`` and ``PROBE`` are bits 16, 17 and 18.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "FEATURE_HEADER",
    "IOMMU_DESTROY",
    "IOMMU_IOAS_ALLOC",
    "PRECOPY_INFO_REINIT",
    "VFIO_API_VERSION",
    "VFIO_CHECK_EXTENSION",
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_FEATURE",
    "VFIO_DEVICE_GET_INFO",
    "VFIO_DEVICE_GET_REGION_INFO",
    "VFIO_DEVICE_RESET",
    "VFIO_GET_API_VERSION",
    "VFIO_GROUP_FLAGS_VIABLE",
    "VFIO_GROUP_GET_DEVICE_FD",
    "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER",
    "VFIO_MIG_GET_PRECOPY_INFO",
    "VFIO_SET_IOMMU",
    "Feature",
    "FeatureOp",
    "RegionInfo",
    "VFIO_TYPE1v2_IOMMU",
    "feature_request",
    "io",
    "ioc",
    "ioctl_name",
]

# --- ioctl numbers ------------------------------------------------------------------

_NRBITS: Final = 8
_TYPEBITS: Final = 8
_SIZEBITS: Final = 14
_NRSHIFT: Final = 0
_TYPESHIFT: Final = _NRSHIFT + _NRBITS
_SIZESHIFT: Final = _TYPESHIFT + _TYPEBITS
_DIRSHIFT: Final = _SIZESHIFT + _SIZEBITS

IOC_NONE: Final = 0
IOC_WRITE: Final = 1
IOC_READ: Final = 2


def ioc(direction: int, kind: int | str, nr: int, size: int) -> int:
    """The kernel's ``_IOC(dir, type, nr, size)``."""
    code = ord(kind) if isinstance(kind, str) else kind
    if not 0 <= direction < 4 or not 0 <= code < 256 or not 0 <= nr < 256:
        raise ValueError(f"ioctl field out of range: dir={direction} type={code} nr={nr}")
    if not 0 <= size < 1 << _SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_SIZEBITS} bits")
    return (direction << _DIRSHIFT) | (size << _SIZESHIFT) | (code << _TYPESHIFT) | nr


def io(kind: int | str, nr: int) -> int:
    """The kernel's ``_IO(type, nr)``: no argument size, no direction."""
    return ioc(IOC_NONE, kind, nr, 0)


VFIO_TYPE: Final = ";"
VFIO_BASE: Final = 100
IOMMUFD_TYPE: Final = ";"
IOMMUFD_CMD_BASE: Final = 0x80

VFIO_API_VERSION: Final = 0
VFIO_TYPE1v2_IOMMU: Final = 3

# The container (/dev/vfio/vfio).
VFIO_GET_API_VERSION: Final = io(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION: Final = io(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU: Final = io(VFIO_TYPE, VFIO_BASE + 2)
# The group (/dev/vfio/<N>).
VFIO_GROUP_GET_STATUS: Final = io(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER: Final = io(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER: Final = io(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD: Final = io(VFIO_TYPE, VFIO_BASE + 6)
# The device.
VFIO_DEVICE_GET_INFO: Final = io(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO: Final = io(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_RESET: Final = io(VFIO_TYPE, VFIO_BASE + 11)
VFIO_DEVICE_FEATURE: Final = io(VFIO_TYPE, VFIO_BASE + 17)
VFIO_DEVICE_BIND_IOMMUFD: Final = io(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT: Final = io(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT: Final = io(VFIO_TYPE, VFIO_BASE + 20)
# The migration data_fd.
VFIO_MIG_GET_PRECOPY_INFO: Final = io(VFIO_TYPE, VFIO_BASE + 21)
# iommufd (/dev/iommu).
IOMMU_DESTROY: Final = io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 0)
IOMMU_IOAS_ALLOC: Final = io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 1)

_IOCTL_NAMES: Final = {
    VFIO_GET_API_VERSION: "VFIO_GET_API_VERSION",
    VFIO_CHECK_EXTENSION: "VFIO_CHECK_EXTENSION",
    VFIO_SET_IOMMU: "VFIO_SET_IOMMU",
    VFIO_GROUP_GET_STATUS: "VFIO_GROUP_GET_STATUS",
    VFIO_GROUP_SET_CONTAINER: "VFIO_GROUP_SET_CONTAINER",
    VFIO_GROUP_UNSET_CONTAINER: "VFIO_GROUP_UNSET_CONTAINER",
    VFIO_GROUP_GET_DEVICE_FD: "VFIO_GROUP_GET_DEVICE_FD",
    VFIO_DEVICE_GET_INFO: "VFIO_DEVICE_GET_INFO",
    VFIO_DEVICE_GET_REGION_INFO: "VFIO_DEVICE_GET_REGION_INFO",
    VFIO_DEVICE_RESET: "VFIO_DEVICE_RESET",
    VFIO_DEVICE_FEATURE: "VFIO_DEVICE_FEATURE",
    VFIO_DEVICE_BIND_IOMMUFD: "VFIO_DEVICE_BIND_IOMMUFD",
    VFIO_DEVICE_ATTACH_IOMMUFD_PT: "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    VFIO_DEVICE_DETACH_IOMMUFD_PT: "VFIO_DEVICE_DETACH_IOMMUFD_PT",
    VFIO_MIG_GET_PRECOPY_INFO: "VFIO_MIG_GET_PRECOPY_INFO",
    IOMMU_DESTROY: "IOMMU_DESTROY",
    IOMMU_IOAS_ALLOC: "IOMMU_IOAS_ALLOC",
}


def ioctl_name(request: int) -> str:
    """The uAPI name of an ioctl number (hex for one this module does not know)."""
    return _IOCTL_NAMES.get(request, f"ioctl {request:#x}")


# --- structures ----------------------------------------------------------------------

# struct vfio_group_status: argsz, flags.
GROUP_STATUS: Final = struct.Struct("=II")
VFIO_GROUP_FLAGS_VIABLE: Final = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET: Final = 1 << 1

# struct vfio_device_info: argsz, flags, num_regions, num_irqs, cap_offset, pad.
DEVICE_INFO: Final = struct.Struct("=IIIIII")
VFIO_DEVICE_FLAGS_RESET: Final = 1 << 0
VFIO_DEVICE_FLAGS_PCI: Final = 1 << 1

# struct vfio_region_info: argsz, flags, index, cap_offset, then u64 size and offset.
REGION_INFO: Final = struct.Struct("=IIIIQQ")
VFIO_REGION_INFO_FLAG_READ: Final = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE: Final = 1 << 1
#: vfio-pci's region indexes: BAR0..BAR5, then the ROM and the config space.
VFIO_PCI_BAR0_REGION_INDEX: Final = 0
VFIO_PCI_CONFIG_REGION_INDEX: Final = 7

# struct vfio_device_feature: argsz, flags, then the feature's data.
FEATURE_HEADER: Final = struct.Struct("=II")
FEATURE_MASK: Final = 0xFFFF


class FeatureOp(enum.IntFlag):
    """The operation bits of ``vfio_device_feature.flags``."""

    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


class Feature(enum.IntEnum):
    """``VFIO_DEVICE_FEATURE_*`` indexes this backend uses."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9
    #: The second version of the pre-copy information: a SET (no data) opts in,
    #: after which ``vfio_precopy_info.flags`` is an output and a driver may
    #: report new initial data (:data:`PRECOPY_INFO_REINIT`).  Defined here as
    #: the 2026 kernel interface proposes it; older kernels and drivers lack it,
    #: so it is probed at run time (``PROBE | SET``) and only then used.
    MIG_PRECOPY_INFO_V2 = 12


# struct vfio_device_feature_migration: one aligned u64 of VFIO_MIGRATION_* flags.
FEATURE_MIGRATION: Final = struct.Struct("=Q")
# struct vfio_device_feature_mig_state: u32 device_state, s32 data_fd.
FEATURE_MIG_STATE: Final = struct.Struct("=Ii")
# struct vfio_device_feature_mig_data_size: aligned u64 stop_copy_length.
FEATURE_MIG_DATA_SIZE: Final = struct.Struct("=Q")
# struct vfio_device_feature_dma_logging_control: u64 page_size, u32 num_ranges,
# u32 reserved, u64 pointer to the ranges.  Only probed here, never started.
FEATURE_DMA_LOGGING_CONTROL: Final = struct.Struct("=QIIQ")

# struct vfio_precopy_info: argsz, flags, aligned u64 initial_bytes and dirty_bytes.
PRECOPY_INFO: Final = struct.Struct("=IIQQ")
#: An output bit of ``vfio_precopy_info.flags`` once the device opted in to
#: ``Feature.MIG_PRECOPY_INFO_V2``: new initial data is on the stream, and
#: ``initial_bytes`` counts it.  Without the opt-in the field is reserved (old
#: kernels hand the caller's flags back), so it is read only after one.
PRECOPY_INFO_REINIT: Final = 1 << 0

# struct vfio_device_bind_iommufd: argsz, flags, s32 iommufd, u32 out_devid.
BIND_IOMMUFD: Final = struct.Struct("=IIiI")
# struct vfio_device_attach_iommufd_pt: argsz, flags, u32 pt_id.
ATTACH_IOMMUFD_PT: Final = struct.Struct("=III")
# struct iommu_ioas_alloc: size, flags, u32 out_ioas_id.
IOAS_ALLOC: Final = struct.Struct("=III")
# struct iommu_destroy: size, u32 id.
IOMMU_DESTROY_ARG: Final = struct.Struct("=II")


def feature_request(feature: Feature, op: FeatureOp, payload: bytes | int = 0) -> bytearray:
    """A ``VFIO_DEVICE_FEATURE`` argument: the header, then ``payload``.

    ``payload`` is the feature's data as bytes, or a number of zero bytes to
    reserve for the kernel to fill (a GET).
    """
    data = bytes(payload) if isinstance(payload, int) else payload
    buf = bytearray(FEATURE_HEADER.size + len(data))
    FEATURE_HEADER.pack_into(buf, 0, len(buf), int(op) | int(feature))
    buf[FEATURE_HEADER.size :] = data
    return buf


def feature_data(buf: bytearray) -> memoryview:
    """The data part of a ``VFIO_DEVICE_FEATURE`` argument (after the header)."""
    return memoryview(buf)[FEATURE_HEADER.size :]


def mig_state_request(op: FeatureOp, state: int = 0) -> bytearray:
    """GET or SET ``MIG_DEVICE_STATE``; ``data_fd`` starts at -1."""
    return feature_request(Feature.MIG_DEVICE_STATE, op, FEATURE_MIG_STATE.pack(state, -1))


def mig_state_result(buf: bytearray) -> tuple[int, int]:
    """``(device_state, data_fd)`` from a ``MIG_DEVICE_STATE`` buffer the kernel answered."""
    state, data_fd = FEATURE_MIG_STATE.unpack_from(buf, FEATURE_HEADER.size)
    return int(state), int(data_fd)


def precopy_info_request() -> bytearray:
    return bytearray(PRECOPY_INFO.pack(PRECOPY_INFO.size, 0, 0, 0))


def precopy_info_result(buf: bytearray) -> tuple[int, int, int]:
    """``(initial_bytes, dirty_bytes, flags)``."""
    _, flags, initial, dirty = PRECOPY_INFO.unpack(buf)
    return int(initial), int(dirty), int(flags)


@dataclass(frozen=True)
class RegionInfo:
    """What ``VFIO_DEVICE_GET_REGION_INFO`` says about one region of a device."""

    index: int
    flags: int
    size: int
    offset: int

    @property
    def readable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_WRITE)


def region_info_request(index: int) -> bytearray:
    return bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))


def region_info_result(buf: bytearray) -> RegionInfo:
    _, flags, index, _, size, offset = REGION_INFO.unpack(buf)
    return RegionInfo(index=index, flags=flags, size=size, offset=offset)
