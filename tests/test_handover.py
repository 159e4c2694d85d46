"""The device handover socket: the protocol, its refusals, and the handles' life.

The descriptors are real.  This host has no VFIO or vhost-vdpa device, so
the refusals use real descriptors of other kinds (a pipe, a regular file,
/dev/null, an eventfd) checked against the real /proc/devices; the accepted
handovers use /dev/null with the kernel's table of character device drivers
replaced by one where its major is "vhost-vdpa" (``PRETEND_VDPA``): the kind
check still inspects the descriptor itself.  The kernel lab hands over a real
vhost-vdpa device.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from prometheus_client import CollectorRegistry

from orchestrator import daemon
from orchestrator.backends.simulated import SimulatedBackend, SimulatedParams
from orchestrator.backends.vfio import VfioBackend
from orchestrator.daemon import DaemonError
from orchestrator.errors import PlanError
from orchestrator.handover import (
    HandleBusy,
    HandleRegistry,
    HandoverClient,
    HandoverError,
    HandoverServer,
    char_device_names,
    check_kind,
)
from orchestrator.journal import Journal
from orchestrator.metrics import Metrics
from orchestrator.resolve import resolve
from orchestrator.service import MigrationService
from orchestrator.settings import Settings
from tests.helpers import make_plan

T = TypeVar("T")

NULL_MAJOR = os.major(os.stat("/dev/null").st_rdev)
PRETEND_VDPA = {NULL_MAJOR: "vhost-vdpa"}


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@contextmanager
def no_leaked_fds() -> Iterator[None]:
    """The block leaves no descriptor open that was not open before it."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # os.listdir's own descriptor is gone by now; anything else is a leak.
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked}


@asynccontextmanager
async def handover_server(
    path: Path, registry: HandleRegistry, majors: dict[int, str] | None = None
) -> AsyncIterator[HandoverServer]:
    listener = daemon.bind_unix_socket(path, socket.SOCK_SEQPACKET, "handover_socket")
    server = HandoverServer(
        registry, char_devices=(lambda: majors) if majors is not None else char_device_names
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listener)
        yield server
        nursery.cancel_scope.cancel()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """The client blocks: run it beside the server's trio loop."""
    return await trio.to_thread.run_sync(fn, *args)


async def eventually(done: Callable[[], bool]) -> None:
    """Wait (at most 5 s) for the server to act on what the client did."""
    for _ in range(500):
        if done():
            return
        await trio.sleep(0.01)
    pytest.fail("the server did not act within 5 s")


def null_rw() -> int:
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


# -- the kind check, on real descriptors ---------------------------------------------


def test_real_non_device_descriptors_are_refused_as_what_they_are(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    regular = tmp_path / "state.bin"
    regular.write_bytes(b"x")
    file_fd = os.open(regular, os.O_RDWR)
    null = null_rw()
    event = os.eventfd(0)
    try:
        cases = [
            (read_end, "vfio", "a pipe, not a VFIO device"),
            (file_fd, "vhost_vdpa", f"the regular file {regular}, not a vhost-vdpa device"),
            (null, "vhost_vdpa", "the character device /dev/null"),
            (null, "vfio", "driver 'mem'"),
            (event, "vfio", "anon_inode:[eventfd], not a VFIO device"),
        ]
        for fd, kind, message in cases:
            with pytest.raises(HandoverError) as caught:
                check_kind(fd, kind)
            assert caught.value.code == "wrong_kind"
            assert message in caught.value.message, caught.value.message
    finally:
        for fd in (read_end, write_end, file_fd, null, event):
            os.close(fd)


def test_the_check_reads_the_driver_of_the_major_and_the_access_mode() -> None:
    null, read_only = null_rw(), os.open("/dev/null", os.O_RDONLY)
    try:
        check_kind(null, "vhost_vdpa", PRETEND_VDPA)  # the right major: accepted
        with pytest.raises(HandoverError, match="not a VFIO device"):
            check_kind(null, "vfio", PRETEND_VDPA)
        with pytest.raises(HandoverError, match=r"not open for reading and writing \(O_RDWR\)"):
            check_kind(read_only, "vhost_vdpa", PRETEND_VDPA)
        with pytest.raises(HandoverError, match="VFIO group"):
            check_kind(null, "vfio", {NULL_MAJOR: "vfio"})
        check_kind(null, "vfio", {NULL_MAJOR: "vfio-dev"})  # a VFIO device cdev
    finally:
        os.close(null)
        os.close(read_only)


def test_proc_devices_is_read_by_section() -> None:
    names = char_device_names()
    assert names[NULL_MAJOR] == "mem"
    assert all(isinstance(k, int) and v for k, v in names.items())


# -- the protocol -----------------------------------------------------------------------


async def test_hand_over_list_open_and_take_back(short_dir: Path) -> None:
    registry = HandleRegistry()
    path = short_dir / "handover.sock"
    with no_leaked_fds():
        async with handover_server(path, registry, PRETEND_VDPA):
            client = await in_thread(HandoverClient, path)
            null = null_rw()
            try:
                await in_thread(client.register, "vm1")
                handle = await in_thread(client.hand_over, "vm1", "nic0", "vhost_vdpa", null)
                assert handle == "vm1/nic0"
                listing = await in_thread(client.list)
                assert listing["vms"] == ["vm1"]
                assert listing["handles"] == [
                    {"handle": "vm1/nic0", "kind": "vhost_vdpa", "in_use_by": None}
                ]
                # A backend's way in: a new descriptor of the same open file.
                dup = registry.open(handle)
                try:
                    assert os.fstat(dup).st_rdev == os.fstat(null).st_rdev
                    assert os.get_inheritable(dup) is False
                finally:
                    os.close(dup)
                back = await in_thread(client.take_back, handle)
                assert os.fstat(back).st_rdev == os.fstat(null).st_rdev
                os.close(back)
                assert len(registry) == 0
                assert (await in_thread(client.list))["handles"] == []
            finally:
                os.close(null)
                client.close()


async def test_every_refusal_is_clear_and_changes_nothing(short_dir: Path) -> None:
    registry = HandleRegistry()
    path = short_dir / "handover.sock"
    read_end, write_end = os.pipe()
    null = null_rw()

    def refusals(client: HandoverClient) -> list[tuple[str, str]]:
        hand_over = {"op": "hand_over", "vm": "vm1", "device": "nic0", "kind": "vhost_vdpa"}
        requests: list[tuple[dict[str, Any], list[int]]] = [
            (hand_over, [null]),  # vm1 is not registered yet
            ({"op": "register", "vm": "vm/1"}, []),
            ({"op": "register", "vm": "vm1"}, [null]),
            (hand_over, []),
            ({**hand_over, "kind": "nvme"}, [null]),
            ({**hand_over, "kind": "vfio"}, [null]),
            (hand_over, [read_end]),
            (hand_over, [null, null]),
            ({"op": "take_back", "handle": "vm1/nic0"}, []),
            ({"op": "reboot"}, []),
        ]
        out = []
        for index, (message, fds) in enumerate(requests):
            reply, received = client.request(message, fds)
            assert not received
            assert reply["ok"] is False, (message, reply)
            out.append((reply["error"]["code"], reply["error"]["message"]))
            if index == 2:
                client.register("vm1")  # from here on, vm1 is known
        return out

    with no_leaked_fds():
        async with handover_server(path, registry, PRETEND_VDPA):
            client = await in_thread(HandoverClient, path)
            try:
                codes = await in_thread(refusals, client)
                assert len(registry) == 0
                # Still served: a refusal does not close the connection.
                assert (await in_thread(client.list))["vms"] == ["vm1"]
            finally:
                client.close()
    os.close(read_end)
    os.close(write_end)
    os.close(null)
    assert [code for code, _ in codes] == [
        "unknown_vm",
        "bad_request",
        "unexpected_descriptor",
        "no_descriptor",
        "bad_kind",
        "wrong_kind",
        "wrong_kind",
        "too_many_descriptors",
        "unknown_handle",
        "unknown_op",
    ]
    messages = dict(codes)
    assert "register" in messages["unknown_vm"]
    assert "a pipe, not a vhost-vdpa device" in codes[6][1]


async def test_garbage_gets_an_error_and_the_connection_closes(short_dir: Path) -> None:
    registry = HandleRegistry()
    path = short_dir / "handover.sock"

    def send_raw(data: bytes) -> tuple[dict[str, Any], bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.send(data)
            reply = json.loads(sock.recv(70000))
            return reply, sock.recv(70000)  # b"": the daemon closed it

    async with handover_server(path, registry, PRETEND_VDPA):
        for data, code in [
            (b"\xff\xfe not json", "bad_request"),
            (b"[1, 2]", "bad_request"),
            (b'{"vm": "vm1"}', "bad_request"),
            (b'{"op": "list", "pad": "' + b"x" * 70000 + b'"}', "too_large"),
        ]:
            reply, after = await in_thread(send_raw, data)
            assert reply["ok"] is False and reply["error"]["code"] == code, reply
            assert after == b""


async def test_a_vmm_that_disconnects_releases_its_handles(short_dir: Path) -> None:
    registry = HandleRegistry()
    path = short_dir / "handover.sock"
    with no_leaked_fds():
        async with handover_server(path, registry, PRETEND_VDPA):
            client = await in_thread(HandoverClient, path)
            null = null_rw()
            await in_thread(client.register, "vm1")
            await in_thread(client.hand_over, "vm1", "nic0", "vhost_vdpa", null)
            await in_thread(client.hand_over, "vm1", "nic1", "vhost_vdpa", null)
            os.close(null)
            assert len(registry) == 2
            client.close()
            await eventually(lambda: len(registry) == 0)
            # The VM is free for another VMM connection.
            other = await in_thread(HandoverClient, path)
            await in_thread(other.register, "vm1")
            other.close()


async def test_a_handle_in_use_cannot_be_taken_back_until_its_migration_ends(
    short_dir: Path,
) -> None:
    registry = HandleRegistry()
    path = short_dir / "handover.sock"
    with no_leaked_fds():
        async with handover_server(path, registry, PRETEND_VDPA):
            client = await in_thread(HandoverClient, path)
            null = null_rw()
            await in_thread(client.register, "vm1")
            handle = await in_thread(client.hand_over, "vm1", "nic0", "vhost_vdpa", null)
            registry.claim("m1", [handle])
            with pytest.raises(HandleBusy, match="m1"):
                registry.claim("m2", [handle])
            with pytest.raises(HandoverError) as caught:
                await in_thread(client.take_back, handle)
            assert caught.value.code == "in_use" and "migration m1" in caught.value.message
            with pytest.raises(HandoverError, match="in_use"):
                await in_thread(client.unregister, "vm1")
            # The VMM goes away mid-migration: the handle stays for the migration.
            client.close()
            await eventually(lambda: getattr(registry.lookup(handle), "owner", 0) is None)
            dup = registry.open(handle)
            os.close(dup)
            registry.release("m1")  # the migration ended: now it is closed
            assert registry.lookup(handle) is None
            os.close(null)


# -- plans, the service and the daemon ------------------------------------------------------


class HandleParams(SimulatedParams):
    handle: str | None = None


class HandleBackend(SimulatedBackend):
    """A simulated backend whose devices a plan may name by handle, as vfio's will."""

    name = "sim_handle"
    params_model = HandleParams


def handle_plan(vm: str, handle: str) -> Any:
    device = {
        "name": "nic0",
        "backend": "sim_handle",
        "source": {"state_mib": 0.0625, "transition_ms": 20, "handle": handle},
    }
    return make_plan([device], vm=vm)


def registry_with(handle_vm: str = "vm1") -> tuple[HandleRegistry, int]:
    registry = HandleRegistry()
    registry.register_vm(1, handle_vm)
    fd = null_rw()
    registry.hand_over(1, handle_vm, "nic0", "vhost_vdpa", fd)
    return registry, fd


def test_resolve_names_a_handle_that_is_not_there_or_not_the_vm_s() -> None:
    backends = {"sim_handle": HandleBackend()}
    registry, _ = registry_with("vm1")
    try:
        resolved = resolve(handle_plan("vm1", "vm1/nic0"), backends, registry)
        assert resolved.handles() == ["vm1/nic0"]
        with pytest.raises(PlanError) as caught:
            resolve(handle_plan("vm1", "vm1/nic9"), backends, registry)
        assert caught.value.problems[0].path == "devices[0].source.handle"
        assert "no device is handed over as 'vm1/nic9'" in caught.value.problems[0].message
        with pytest.raises(PlanError) as caught:
            resolve(handle_plan("vm2", "vm1/nic0"), backends, registry)
        assert "a device of VM 'vm1', and the plan migrates 'vm2'" in str(caught.value)
    finally:
        registry.close_all()


async def test_the_service_holds_a_handle_while_its_migration_runs(tmp_path: Path) -> None:
    registry, _ = registry_with("vm1")
    async with await Journal.open(tmp_path / "state") as journal:
        service = MigrationService(
            journal,
            Metrics(CollectorRegistry()),
            backends={"sim_handle": HandleBackend()},
            handles=registry,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            status, _ = await service.submit(handle_plan("vm1", "vm1/nic0"))
            entry = registry.lookup("vm1/nic0")
            assert entry is not None and entry.migration == status.id
            with pytest.raises(HandoverError, match="in_use"):
                registry.take_back(1, "vm1/nic0")
            # The same handle under another device name: still refused.
            other = handle_plan("vm1", "vm1/nic0").model_copy(deep=True)
            other.devices[0].name = "nic0-again"
            with pytest.raises(HandleBusy):
                await service.submit(other)
            async for _ in service.follow(status.id):
                pass
            assert (await service.status(status.id)).outcome == "succeeded"
            assert entry.migration is None
            os.close(registry.take_back(1, "vm1/nic0"))
            await service.shutdown(grace_s=5)
            nursery.cancel_scope.cancel()


async def test_the_daemon_serves_the_handover_socket_mode_0600_and_locked(
    short_dir: Path, token_file: Path
) -> None:
    def settings(name: str) -> Settings:
        return Settings.load(
            flags={
                "state_dir": str(short_dir / name),
                "handover_socket": str(short_dir / "handover.sock"),
                "api": {
                    "unix_socket": str(short_dir / f"{name}.sock"),
                    "token_file": str(token_file),
                },
            }
        )

    stop = trio.Event()
    path = short_dir / "handover.sock"
    async with trio.open_nursery() as nursery:
        running = await nursery.start(
            partial(daemon.serve, settings("a"), shutdown_trigger=stop.wait)
        )
        assert running.handover_socket == path
        # One registry: plans' handles are checked against the one backends open from.
        vfio = running.service.backends["vfio"]
        assert isinstance(vfio, VfioBackend) and vfio.handles is running.service.handles
        mode = os.lstat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        client = await in_thread(HandoverClient, path)
        await in_thread(client.register, "vm1")
        null = null_rw()
        with pytest.raises(HandoverError, match="wrong_kind"):
            # The daemon checks against the real /proc/devices.
            await in_thread(client.hand_over, "vm1", "nic0", "vhost_vdpa", null)
        os.close(null)
        client.close()
        with pytest.raises(DaemonError, match="takes device handovers on"):
            await daemon.serve(settings("b"), shutdown_trigger=trio.sleep_forever)
        stop.set()
    assert not path.exists()


async def test_the_cli_stand_in_holds_a_handover_until_its_input_ends(short_dir: Path) -> None:
    registry = HandleRegistry()
    path = short_dir / "handover.sock"
    argv = [
        sys.executable, "-m", "orchestrator", "handover", "--socket", str(path),
        "--vm", "vm1", "--name", "nic0", "--kind", "vhost_vdpa", "/dev/null",
    ]  # fmt: skip
    async with handover_server(path, registry, PRETEND_VDPA):
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                partial(trio.run_process, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            )
            assert proc.stdout is not None and proc.stdin is not None
            line = b""
            with trio.fail_after(30):
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(100)
                    assert chunk, "the stand-in exited before printing its handle"
                    line += chunk
            assert line == b"vm1/nic0\n"
            entry = registry.lookup("vm1/nic0")
            assert entry is not None and entry.kind == "vhost_vdpa"
            await proc.stdin.aclose()  # the stand-in lets go
            with trio.fail_after(30):
                assert await proc.wait() == 0
        await eventually(lambda: len(registry) == 0)


def test_the_cli_stand_in_says_when_the_daemon_is_unreachable(short_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "handover", "--socket", str(short_dir / "none"),
         "--vm", "vm1", "--name", "nic0", "--kind", "vfio", "/dev/null"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 5  # the daemon could not be reached
    assert "orchestrator handover:" in result.stderr and "Traceback" not in result.stderr
