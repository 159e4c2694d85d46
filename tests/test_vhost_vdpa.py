"""The vhost-vdpa uAPI module, the state record and the backend's plan checks, on any host.

The ioctl numbers are checked against values worked out by hand from
``include/uapi/linux/vhost.h`` (``_IOC(dir, 0xAF, nr, size)`` = ``dir << 30 |
size << 16 | 0xAF << 8 | nr``, with ``_IOR`` = 2, ``_IOW`` = 1, ``_IOWR`` = 3)
and the structure sizes against ``sizeof`` of the C structures in
``vhost_types.h``.  The backend's device work runs against the real
vdpa_sim_net in the kernel lab (``tests/kernel/test_vdpa.py``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator.backends import BACKENDS
from orchestrator.backends import vhost_vdpa_uapi as uapi
from orchestrator.backends.vhost_vdpa import (
    OwnerError,
    SocketOwner,
    VhostVdpaBackend,
    VhostVdpaParams,
    refusal,
)
from orchestrator.report import DeviceReport


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (uapi.VHOST_GET_FEATURES, 0x8008AF00),
        (uapi.VHOST_SET_FEATURES, 0x4008AF00),
        (uapi.VHOST_SET_OWNER, 0x0000AF01),
        (uapi.VHOST_SET_VRING_NUM, 0x4008AF10),
        (uapi.VHOST_SET_VRING_ADDR, 0x4028AF11),
        (uapi.VHOST_SET_VRING_BASE, 0x4008AF12),
        (uapi.VHOST_GET_VRING_BASE, 0xC008AF12),
        (uapi.VHOST_SET_VRING_KICK, 0x4008AF20),
        (uapi.VHOST_SET_VRING_CALL, 0x4008AF21),
        (uapi.VHOST_SET_BACKEND_FEATURES, 0x4008AF25),
        (uapi.VHOST_GET_BACKEND_FEATURES, 0x8008AF26),
        (uapi.VHOST_VDPA_GET_DEVICE_ID, 0x8004AF70),
        (uapi.VHOST_VDPA_GET_STATUS, 0x8001AF71),
        (uapi.VHOST_VDPA_SET_STATUS, 0x4001AF72),
        (uapi.VHOST_VDPA_GET_CONFIG, 0x8008AF73),
        (uapi.VHOST_VDPA_SET_VRING_ENABLE, 0x4008AF75),
        (uapi.VHOST_VDPA_GET_VRING_NUM, 0x8002AF76),
        (uapi.VHOST_VDPA_GET_CONFIG_SIZE, 0x8004AF79),
        (uapi.VHOST_VDPA_SUSPEND, 0x0000AF7D),
        (uapi.VHOST_VDPA_RESUME, 0x0000AF7E),
        (uapi.VHOST_VDPA_GET_VQS_COUNT, 0x8004AF80),
        (uapi.VHOST_VDPA_GET_VRING_SIZE, 0xC008AF82),
    ],
)
def test_ioctl_numbers_match_the_header(request_: int, expected: int) -> None:
    assert request_ == expected, f"{uapi.ioctl_name(request_)}: {request_:#x} != {expected:#x}"
    assert uapi.ioctl_name(request_).startswith("VHOST_")


def test_structure_sizes_are_the_c_sizeof() -> None:
    assert uapi.VRING_STATE.size == 8  # two unsigned int
    assert uapi.VRING_FILE.size == 8
    assert uapi.VRING_ADDR.size == 40  # index, flags, four __u64
    assert uapi.IOTLB_MSG.size == 32  # three __u64, two __u8, padded to 8
    assert uapi.MSG_V2.size == 72  # type, asid, a 64-byte union
    assert uapi.VDPA_CONFIG.size == 8  # buf[] is a flexible array
    message = uapi.iotlb_message(
        uapi.VHOST_IOTLB_UPDATE, iova=0x1000, size=0x2000, uaddr=0x7F00, perm=3, asid=1
    )
    assert len(message) == 72
    # type, asid, then iova, size, uaddr, perm, type at their C offsets.
    assert message[:8] == (2).to_bytes(4, "little") + (1).to_bytes(4, "little")
    assert message[8:16] == (0x1000).to_bytes(8, "little")
    assert message[32] == 3 and message[33] == uapi.VHOST_IOTLB_UPDATE
    assert uapi.ioctl_name(0x1234) == "ioctl 0x1234"


def test_bits_and_descriptions() -> None:
    assert uapi.describe_status(0x0F) == "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK"
    assert uapi.describe_status(0) == "0 (reset)"
    assert uapi.describe_status(0x81) == "ACKNOWLEDGE|FAILED"
    # What vdpa_sim_net offers (KERNEL-LAB.md: 0x17e).
    assert uapi.describe_backend_features(0x17E) == (
        "0x17e (IOTLB_MSG_V2|IOTLB_BATCH|IOTLB_ASID|SUSPEND|RESUME|ENABLE_AFTER_DRIVER_OK"
        "|IOTLB_PERSIST)"
    )
    assert uapi.VHOST_GET_VRING_BASE in uapi.OWNER_ONLY
    assert uapi.VHOST_VDPA_SUSPEND not in uapi.OWNER_ONLY


def test_refusal_names_what_is_missing() -> None:
    assert refusal(0x17E) is None
    why = refusal(0x17E & ~(1 << uapi.BACKEND_F_SUSPEND))
    assert why is not None and "lack SUSPEND" in why and "migrated live" in why
    why = refusal(0x06)  # what VDUSE offers: no SUSPEND, no RESUME
    assert why is not None and "SUSPEND and RESUME" in why and "rollback" in why


def record(**changes: Any) -> uapi.DeviceRecord:
    fields: dict[str, Any] = {
        "device_id": 1,
        "features": 0x300010028,
        "device_features": 0x308830028,
        "backend_features": 0x17E,
        "status": 0x0F,
        "config": bytes.fromhex("525400123456010001000000dc05") + bytes(10),
        "vrings": (uapi.VringRecord(0, 256, 17, True), uapi.VringRecord(1, 256, 65535, False)),
    }
    fields.update(changes)
    return uapi.DeviceRecord(**fields)


def test_the_record_round_trips() -> None:
    original = record()
    data = original.encode()
    assert uapi.DeviceRecord.decode(data) == original
    # magic 8, version and flags 4, device id 4, three u64 24, status and padding 4,
    # config length and ring count 8; the config; 16 per ring; the CRC.
    assert len(data) == 52 + 24 + 2 * 16 + 4
    assert uapi.DeviceRecord.decode(record(vrings=(), config=b"").encode()).vrings == ()


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:20], "shorter than its header"),
        (lambda d: b"NOTVDPA\0" + d[8:], "not a vhost-vdpa record"),
        (lambda d: d[:8] + (2).to_bytes(2, "little") + d[10:], "record version 2"),
        (lambda d: d[:-5] + d[-4:], "its header"),
        (lambda d: d + b"\0", "its header"),
        (lambda d: d[:60] + bytes([d[60] ^ 1]) + d[61:], "CRC"),
    ],
)
def test_a_damaged_record_is_refused_with_the_reason(mangle: Any, message: str) -> None:
    with pytest.raises(uapi.RecordError, match=message):
        uapi.DeviceRecord.decode(mangle(record().encode()))


def test_params_name_one_descriptor_and_an_owner_channel() -> None:
    ok = VhostVdpaParams(fd=5, owner_socket="/run/vmm/nic0.sock")
    assert ok.address == "fd 5"
    assert VhostVdpaParams(handle="vm1/nic0", owner_socket="/s").address == "handle vm1/nic0"
    for bad in (
        {"owner_socket": "/s"},
        {"fd": 5, "handle": "vm1/nic0", "owner_socket": "/s"},
        {"fd": 5},
        {"fd": 1, "owner_socket": "/s"},
        {"fd": 5, "owner_socket": "relative.sock"},
        {"handle": "no-slash", "owner_socket": "/s"},
        {"fd": 5, "owner_socket": "/s", "path": "/dev/vhost-vdpa-0"},
    ):
        with pytest.raises(ValidationError):
            VhostVdpaParams.model_validate(bad)


def test_the_backend_is_registered_and_takes_handles() -> None:
    backend = BACKENDS["vhost_vdpa"]
    assert isinstance(backend, VhostVdpaBackend)
    source = VhostVdpaParams(handle="vm1/nic0", owner_socket="/a")
    destination = VhostVdpaParams(handle="vm1/nic1", owner_socket="/b")
    assert backend.device_keys("nic", source, destination) == [
        "vhost_vdpa:handle:vm1/nic0",
        "vhost_vdpa:handle:vm1/nic1",
    ]
    assert backend.check_pair(source, destination) == []


def test_check_pair_refuses_descriptors_that_are_not_vhost_vdpa(tmp_path: Path) -> None:
    read, write = os.pipe()
    try:
        source = VhostVdpaParams(fd=read, owner_socket="/a")
        destination = VhostVdpaParams(fd=write, owner_socket="/a")
        problems = {p.path: p.message for p in VhostVdpaBackend().check_pair(source, destination)}
        assert "a pipe" in problems["source.fd"] and "vhost-vdpa" in problems["source.fd"]
        assert "destination.fd" in problems
        assert "same owner channel" in problems["destination.owner_socket"]
    finally:
        os.close(read)
        os.close(write)


def test_the_report_carries_backend_timings() -> None:
    report = DeviceReport(
        name="nic0",
        backend="vhost_vdpa",
        source_state="STOP",
        destination_state="RUNNING",
        backend_timings_ms={"source_suspend": 0.2, "destination_resume": 0.1},
    )
    assert report.model_dump()["backend_timings_ms"]["source_suspend"] == 0.2


# -- the owner channel client ------------------------------------------------------------


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, Any]], list[Any]]]:
    """A scripted VMM end of an owner channel: replies are taken from ``replies``."""
    path = tmp_path / "owner.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    seen: list[dict[str, Any]] = []
    replies: list[Any] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                seen.append(json.loads(data))
                reply = replies.pop(0)
                if reply is None:
                    return
                conn.send(reply if isinstance(reply, bytes) else json.dumps(reply).encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, seen, replies
    listener.close()
    thread.join(timeout=5)


def test_the_owner_channel_speaks_the_protocol(
    vmm: tuple[Path, list[dict[str, Any]], list[Any]],
) -> None:
    path, seen, replies = vmm
    replies += [
        {"ok": True, "features": 7, "vrings": [{"index": 1, "size": 256, "base": 3, "enabled": 1}]},
        {"ok": True},
        {"ok": True},
        {"ok": False, "error": "ring 9 is not set up"},
        {"ok": True, "features": 7},
        b"not json",
        None,
    ]
    owner = SocketOwner(str(path), timeout_s=5)
    features, rings = owner.vrings()
    assert features == 7 and rings == [uapi.VringRecord(1, 256, 3, True)]
    owner.set_bases(rings)
    owner.enable(rings)
    with pytest.raises(OwnerError, match="refused 'set_bases': ring 9 is not set up"):
        owner.set_bases([uapi.VringRecord(9, 256, 0, True)])
    with pytest.raises(OwnerError, match="malformed"):
        owner.vrings()
    with pytest.raises(OwnerError, match="not JSON"):
        owner.vrings()
    with pytest.raises(OwnerError, match="closed the owner channel"):
        owner.vrings()
    owner.close()
    assert [m["op"] for m in seen] == [
        "vrings",
        "set_bases",
        "enable",
        "set_bases",
        "vrings",
        "vrings",
        "vrings",
    ]
    assert seen[1]["vrings"] == [{"index": 1, "size": 256, "base": 3}]
    assert seen[2]["vrings"] == [{"index": 1, "enabled": True}]


def test_an_owner_channel_nobody_serves_is_named(tmp_path: Path) -> None:
    with pytest.raises(OwnerError, match="cannot reach the VMM's owner channel"):
        SocketOwner(str(tmp_path / "nobody.sock"))


def test_a_vdpa_identity_and_what_a_destination_must_match() -> None:
    from orchestrator.backends.vhost_vdpa import vdpa_identity
    from orchestrator.compat import compare
    from orchestrator.states import Capabilities, MigrationFlags

    caps = Capabilities(MigrationFlags.STOP_COPY | MigrationFlags.P2P)

    def nic(features: int = 0x1_3000_0020, queue_size: int = 256) -> Any:
        return vdpa_identity(
            device_id=1,
            features=features,
            config_size=12,
            queues=3,
            queue_size=queue_size,
            caps=caps,
        )

    source = nic()
    assert source.model == "virtio-1"
    assert source.fields == {
        "device_id": 1,
        "features": 0x1_3000_0020,
        "config_size": 12,
        "queues": 3,
        "queue_size": 256,
        "migration": ("P2P", "STOP_COPY"),
    }
    needs = ("P2P", "STOP_COPY")
    # More features on the destination: what the source offers is all there.
    assert compare("nic0", source, nic(features=0x1_3000_0060), needs=needs).mismatches == []
    (fewer,) = compare("nic0", source, nic(features=0x1_0000_0020), needs=needs).mismatches
    assert fewer.field == "features" and "0x30000000" in fewer.message
    (rings,) = compare("nic0", source, nic(queue_size=128), needs=needs).mismatches
    assert rings.message == "device 'nic0': queue_size differs: source 256, destination 128"
    assert "queue_size" in VhostVdpaBackend.identity_fields
