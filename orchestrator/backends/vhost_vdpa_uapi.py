"""The vhost-vdpa uAPI as data: ioctl numbers, structure layouts, the state record.

What it is for
--------------

``orchestrator.backends.vhost_vdpa`` drives ``/dev/vhost-vdpa-N`` devices
through the kernel's vhost interface (``include/uapi/linux/vhost.h`` and
``vhost_types.h``; status and feature bits from ``virtio_config.h``).  This
module is the one place that knows how those ioctls are numbered, how their
argument structures are laid out, and how a device's migration record is
encoded, so that all of it can be checked on any host without a vDPA device
(``tests/test_vhost_vdpa.py``) and reused by the kernel-lab's VMM stand-in
(``tests/kernel/vdpa_vmm.py``).  It does no I/O.

Invariants it keeps
-------------------

* ioctl numbers are the kernel's ``_IOC`` on x86-64 and arm64 (see
  ``vfio_uapi.ioc``); unlike VFIO, vhost declares real directions and sizes
  (``_IOR``, ``_IOW``, ``_IOWR``), and the size is the C ``sizeof`` of the
  argument: ``struct vhost_vdpa_config`` counts only its two ``__u32``
  (its ``buf[]`` is a flexible array).
* Every structure spells each field and each hole with an explicit (native)
  byte order, so its size is the C ``sizeof``: ``struct vhost_iotlb_msg`` is
  32 bytes (three ``__u64``, two ``__u8``, six bytes of tail padding), and
  ``struct vhost_msg_v2`` is 72 (two ``__u32``, then a 64-byte union).
* The migration record (:class:`DeviceRecord`) is versioned, length-checked
  and CRC-protected: a decoder refuses a record of another version, a
  truncated one, one with bytes after its end, or one whose CRC differs,
  with a message that says which.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Final

from orchestrator.backends.vfio_uapi import IOC_NONE, IOC_READ, IOC_WRITE, ioc

__all__ = [
    "BACKEND_FEATURE_NAMES",
    "DeviceRecord",
    "RecordError",
    "VringRecord",
    "describe_backend_features",
    "describe_status",
    "ioctl_name",
]

VHOST_VIRTIO: Final = 0xAF


def _io(nr: int) -> int:
    return ioc(IOC_NONE, VHOST_VIRTIO, nr, 0)


def _ior(nr: int, size: int) -> int:
    return ioc(IOC_READ, VHOST_VIRTIO, nr, size)


def _iow(nr: int, size: int) -> int:
    return ioc(IOC_WRITE, VHOST_VIRTIO, nr, size)


def _iowr(nr: int, size: int) -> int:
    return ioc(IOC_READ | IOC_WRITE, VHOST_VIRTIO, nr, size)


# --- structures ----------------------------------------------------------------------

#: struct vhost_vring_state: unsigned int index, num.
VRING_STATE: Final = struct.Struct("=II")
#: struct vhost_vring_file: unsigned int index, int fd (-1 unbinds).
VRING_FILE: Final = struct.Struct("=Ii")
#: struct vhost_vring_addr: index, flags, then u64 desc, used, avail and log addresses.
VRING_ADDR: Final = struct.Struct("=IIQQQQ")
#: struct vhost_iotlb_msg: u64 iova, size, uaddr; u8 perm, type; 6 bytes of padding.
IOTLB_MSG: Final = struct.Struct("=QQQBB6x")
#: struct vhost_msg_v2: u32 type, u32 asid, a 64-byte union whose first member is the
#: iotlb message.
MSG_V2: Final = struct.Struct("=II32s32x")
#: struct vhost_vdpa_config header: u32 off, u32 len (then len bytes of buf).
VDPA_CONFIG: Final = struct.Struct("=II")
#: struct vhost_vdpa_iova_range: u64 first, u64 last.
IOVA_RANGE: Final = struct.Struct("=QQ")
U64: Final = struct.Struct("=Q")
U32: Final = struct.Struct("=I")
U16: Final = struct.Struct("=H")
U8: Final = struct.Struct("=B")

# --- ioctl numbers ------------------------------------------------------------------

VHOST_GET_FEATURES: Final = _ior(0x00, U64.size)
VHOST_SET_FEATURES: Final = _iow(0x00, U64.size)
VHOST_SET_OWNER: Final = _io(0x01)
VHOST_SET_VRING_NUM: Final = _iow(0x10, VRING_STATE.size)
VHOST_SET_VRING_ADDR: Final = _iow(0x11, VRING_ADDR.size)
VHOST_SET_VRING_BASE: Final = _iow(0x12, VRING_STATE.size)
VHOST_GET_VRING_BASE: Final = _iowr(0x12, VRING_STATE.size)
VHOST_SET_VRING_KICK: Final = _iow(0x20, VRING_FILE.size)
VHOST_SET_VRING_CALL: Final = _iow(0x21, VRING_FILE.size)
VHOST_SET_BACKEND_FEATURES: Final = _iow(0x25, U64.size)
VHOST_GET_BACKEND_FEATURES: Final = _ior(0x26, U64.size)
VHOST_VDPA_GET_DEVICE_ID: Final = _ior(0x70, U32.size)
VHOST_VDPA_GET_STATUS: Final = _ior(0x71, U8.size)
VHOST_VDPA_SET_STATUS: Final = _iow(0x72, U8.size)
VHOST_VDPA_GET_CONFIG: Final = _ior(0x73, VDPA_CONFIG.size)
VHOST_VDPA_SET_CONFIG: Final = _iow(0x74, VDPA_CONFIG.size)
VHOST_VDPA_SET_VRING_ENABLE: Final = _iow(0x75, VRING_STATE.size)
VHOST_VDPA_GET_VRING_NUM: Final = _ior(0x76, U16.size)
VHOST_VDPA_GET_IOVA_RANGE: Final = _ior(0x78, IOVA_RANGE.size)
VHOST_VDPA_GET_CONFIG_SIZE: Final = _ior(0x79, U32.size)
VHOST_VDPA_SUSPEND: Final = _io(0x7D)
VHOST_VDPA_RESUME: Final = _io(0x7E)
VHOST_VDPA_GET_VQS_COUNT: Final = _ior(0x80, U32.size)
VHOST_VDPA_GET_VRING_SIZE: Final = _iowr(0x82, VRING_STATE.size)

_IOCTL_NAMES: Final = {
    value: name
    for name, value in list(globals().items())
    if name.startswith("VHOST_") and isinstance(value, int) and name != "VHOST_VIRTIO"
}

#: The ioctls vhost serves only to the process that called VHOST_SET_OWNER (the
#: kernel compares ``current->mm`` with the owner's: ``vhost_dev_check_owner``).
#: Everything about virtqueues and the IOTLB is among them; suspend, resume,
#: status, features and config are not.
OWNER_ONLY: Final = frozenset(
    {
        VHOST_SET_VRING_NUM,
        VHOST_SET_VRING_ADDR,
        VHOST_SET_VRING_BASE,
        VHOST_GET_VRING_BASE,
        VHOST_SET_VRING_KICK,
        VHOST_SET_VRING_CALL,
        VHOST_VDPA_SET_VRING_ENABLE,
        VHOST_VDPA_GET_VRING_SIZE,
    }
)


def ioctl_name(request: int) -> str:
    """The uAPI name of a vhost ioctl number (hex for one this module does not know)."""
    return _IOCTL_NAMES.get(request, f"ioctl {request:#x}")


# --- bits --------------------------------------------------------------------------

# virtio_config.h: the device status byte.
STATUS_ACKNOWLEDGE: Final = 0x01
STATUS_DRIVER: Final = 0x02
STATUS_DRIVER_OK: Final = 0x04
STATUS_FEATURES_OK: Final = 0x08
STATUS_NEEDS_RESET: Final = 0x40
STATUS_FAILED: Final = 0x80
_STATUS_NAMES: Final = (
    (STATUS_ACKNOWLEDGE, "ACKNOWLEDGE"),
    (STATUS_DRIVER, "DRIVER"),
    (STATUS_FEATURES_OK, "FEATURES_OK"),
    (STATUS_DRIVER_OK, "DRIVER_OK"),
    (STATUS_NEEDS_RESET, "NEEDS_RESET"),
    (STATUS_FAILED, "FAILED"),
)

# virtio_config.h: device-independent feature bits.
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_F_ACCESS_PLATFORM: Final = 33
VIRTIO_F_RING_PACKED: Final = 34

# vhost_types.h: backend feature bits (VHOST_[GS]ET_BACKEND_FEATURES).
BACKEND_F_IOTLB_MSG_V2: Final = 0x1
BACKEND_F_IOTLB_BATCH: Final = 0x2
BACKEND_F_IOTLB_ASID: Final = 0x3
BACKEND_F_SUSPEND: Final = 0x4
BACKEND_F_RESUME: Final = 0x5
BACKEND_F_ENABLE_AFTER_DRIVER_OK: Final = 0x6
BACKEND_F_DESC_ASID: Final = 0x7
BACKEND_F_IOTLB_PERSIST: Final = 0x8
BACKEND_FEATURE_NAMES: Final = {
    BACKEND_F_IOTLB_MSG_V2: "IOTLB_MSG_V2",
    BACKEND_F_IOTLB_BATCH: "IOTLB_BATCH",
    BACKEND_F_IOTLB_ASID: "IOTLB_ASID",
    BACKEND_F_SUSPEND: "SUSPEND",
    BACKEND_F_RESUME: "RESUME",
    BACKEND_F_ENABLE_AFTER_DRIVER_OK: "ENABLE_AFTER_DRIVER_OK",
    BACKEND_F_DESC_ASID: "DESC_ASID",
    BACKEND_F_IOTLB_PERSIST: "IOTLB_PERSIST",
}

# vhost_types.h: IOTLB messages written to the device fd.
VHOST_IOTLB_MSG_V2: Final = 0x2
VHOST_IOTLB_UPDATE: Final = 2
VHOST_IOTLB_INVALIDATE: Final = 3
VHOST_IOTLB_BATCH_BEGIN: Final = 5
VHOST_IOTLB_BATCH_END: Final = 6
VHOST_ACCESS_RW: Final = 0x3

#: virtio device ids (virtio_ids.h) this backend names in messages.
DEVICE_NAMES: Final = {1: "net", 2: "block"}


def bit(n: int) -> int:
    return 1 << n


def describe_status(status: int) -> str:
    """``0x0f`` -> ``"ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK"``; ``0`` -> ``"0 (reset)"``."""
    if status == 0:
        return "0 (reset)"
    names = [name for value, name in _STATUS_NAMES if status & value]
    rest = status & ~sum(value for value, _ in _STATUS_NAMES)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names)


def describe_backend_features(features: int) -> str:
    names = [name for b, name in BACKEND_FEATURE_NAMES.items() if features & bit(b)]
    return f"{features:#x} ({'|'.join(names) or 'none'})"


# --- argument buffers ------------------------------------------------------------------


def vring_state(index: int, num: int = 0) -> bytearray:
    return bytearray(VRING_STATE.pack(index, num))


def vring_state_num(buf: bytearray) -> int:
    return int(VRING_STATE.unpack(buf)[1])


def vring_file(index: int, fd: int) -> bytearray:
    return bytearray(VRING_FILE.pack(index, fd))


def vring_addr(index: int, desc: int, used: int, avail: int) -> bytearray:
    return bytearray(VRING_ADDR.pack(index, 0, desc, used, avail, 0))


def config_request(offset: int, length: int) -> bytearray:
    """A VHOST_VDPA_GET_CONFIG argument: the header, then ``length`` bytes for the kernel."""
    return bytearray(VDPA_CONFIG.pack(offset, length) + bytes(length))


def config_data(buf: bytearray) -> bytes:
    return bytes(buf[VDPA_CONFIG.size :])


def iotlb_message(
    kind: int, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0, asid: int = 0
) -> bytes:
    """One ``struct vhost_msg_v2`` carrying an IOTLB message, as written to the device."""
    body = IOTLB_MSG.pack(iova, size, uaddr, perm, kind)
    return MSG_V2.pack(VHOST_IOTLB_MSG_V2, asid, body)


# --- the migration record ------------------------------------------------------------------

RECORD_MAGIC: Final = b"VDPAMIG\0"
RECORD_VERSION: Final = 1
#: magic, version, flags, device id, negotiated features, device features, backend
#: features, status, 3 bytes padding, config length, number of virtqueues.
_RECORD_HEADER: Final = struct.Struct("<8sHHIQQQB3xII")
#: Per virtqueue: index, size (num), base (as VHOST_GET_VRING_BASE gives it), flags.
_RECORD_VRING: Final = struct.Struct("<IIII")
_RECORD_CRC: Final = struct.Struct("<I")
VRING_ENABLED: Final = 0x1
#: Largest record accepted: 64 KiB of config and 1024 virtqueues is far beyond any device.
MAX_RECORD_BYTES: Final = _RECORD_HEADER.size + 65536 + 1024 * _RECORD_VRING.size + 4


class RecordError(ValueError):
    """A migration record that cannot be decoded; the message says why."""


@dataclass(frozen=True)
class VringRecord:
    """One virtqueue as the record carries it."""

    index: int
    #: Its size (VHOST_SET_VRING_NUM).
    size: int
    #: Its ring position: for a split ring the next available index the device will
    #: read (last_avail_idx); for a packed ring, avail index | wrap << 15 in the low
    #: half and used index | wrap << 15 in the high half, as VHOST_GET_VRING_BASE
    #: encodes it.
    base: int
    enabled: bool


@dataclass(frozen=True)
class DeviceRecord:
    """A vhost-vdpa device's migration state, read after VHOST_VDPA_SUSPEND."""

    device_id: int
    #: The virtio features the driver negotiated (what VHOST_SET_FEATURES set).
    features: int
    #: The features the source device offered (VHOST_GET_FEATURES), for messages.
    device_features: int
    #: VHOST_GET_BACKEND_FEATURES of the source, for messages.
    backend_features: int
    #: The virtio status byte (VHOST_VDPA_GET_STATUS).
    status: int
    #: The whole device config space (VHOST_VDPA_GET_CONFIG).
    config: bytes
    vrings: tuple[VringRecord, ...] = field(default_factory=tuple)

    def encode(self) -> bytes:
        header = _RECORD_HEADER.pack(
            RECORD_MAGIC,
            RECORD_VERSION,
            0,
            self.device_id,
            self.features,
            self.device_features,
            self.backend_features,
            self.status,
            len(self.config),
            len(self.vrings),
        )
        vrings = b"".join(
            _RECORD_VRING.pack(v.index, v.size, v.base, VRING_ENABLED if v.enabled else 0)
            for v in self.vrings
        )
        body = header + self.config + vrings
        return body + _RECORD_CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, data: bytes) -> DeviceRecord:
        if len(data) < _RECORD_HEADER.size + _RECORD_CRC.size:
            raise RecordError(
                f"the record is {len(data)} bytes, shorter than its header "
                f"({_RECORD_HEADER.size + _RECORD_CRC.size})"
            )
        (
            magic,
            version,
            _flags,
            device_id,
            features,
            device_features,
            backend_features,
            status,
            config_len,
            nvrings,
        ) = _RECORD_HEADER.unpack_from(data)
        if magic != RECORD_MAGIC:
            raise RecordError(f"not a vhost-vdpa record (magic {magic!r})")
        if version != RECORD_VERSION:
            raise RecordError(
                f"record version {version}; this orchestrator reads version {RECORD_VERSION}"
            )
        expected = (
            _RECORD_HEADER.size + config_len + nvrings * _RECORD_VRING.size + _RECORD_CRC.size
        )
        if len(data) != expected:
            raise RecordError(
                f"the record is {len(data)} bytes; its header ({config_len} config bytes, "
                f"{nvrings} virtqueues) says {expected}"
            )
        (crc,) = _RECORD_CRC.unpack_from(data, len(data) - _RECORD_CRC.size)
        actual = zlib.crc32(data[: -_RECORD_CRC.size])
        if crc != actual:
            raise RecordError(f"the record's CRC is {crc:#010x}, its bytes give {actual:#010x}")
        offset = _RECORD_HEADER.size
        config = bytes(data[offset : offset + config_len])
        offset += config_len
        vrings = []
        for _ in range(nvrings):
            index, size, base, flags = _RECORD_VRING.unpack_from(data, offset)
            offset += _RECORD_VRING.size
            vrings.append(VringRecord(index, size, base, bool(flags & VRING_ENABLED)))
        return cls(
            device_id=device_id,
            features=features,
            device_features=device_features,
            backend_features=backend_features,
            status=status,
            config=config,
            vrings=tuple(vrings),
        )
