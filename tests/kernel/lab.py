"""What the kernel-lab tests need from the guest: modules, mtty devices, their registers.

mtty (``samples/vfio-mdev/mtty.c``) is a mediated device with one or two
16550-style serial ports, one per I/O BAR (BAR0, BAR1).  Its migration data
is a 24-byte header (magic, version, port count, flags) then one 36-byte
``struct serial_port`` per port: the eight UART registers, the loopback
FIFO with its head, tail and count, the DLAB and overrun flags, the
divisor, FCR, FIFO size and trigger level.  So what a test writes into a
port's registers (scratch, line control, interrupt enable, modem control),
its divisor and the bytes waiting in its FIFO all travel with a migration,
and reading them back on the destination proves the state moved.

Register access goes through VFIO here too, independently of the backend
under test: :class:`MttyHandle` opens the device's group and container
with the uAPI numbers of ``orchestrator.backends.vfio_uapi`` and reads and
writes the BAR at the offset ``VFIO_DEVICE_GET_REGION_INFO`` gives.  A
group can be opened once, so a handle must be closed before anything else
(``orchestrator run``) opens the device, unless the handle is the VMM that
lends the device to the daemon (``tests/kernel/test_handover.py``).

:class:`Daemon` runs ``orchestrator serve`` in the guest, and
:func:`vmm_stand_in` is a ``[vmm]`` command whose pause a test can hold.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from orchestrator.backends import vfio_uapi as uapi
from orchestrator.states import DeviceState

MDEV_DEVICES = Path("/sys/bus/mdev/devices")
MTTY_TYPES = Path("/sys/class/mdev_bus/mtty/mdev_supported_types")

# 16550 register offsets in a port's BAR (DLAB clear unless said).
UART_RX = 0  # read: next FIFO byte; with DLAB: divisor low byte
UART_TX = 0  # write: into the loopback FIFO; with DLAB: divisor low byte
UART_IER = 1  # with DLAB: divisor high byte
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_SCR = 7
LCR_DLAB = 0x80
LSR_DATA_READY = 0x01

#: mtty's migration data: header, then one struct serial_port per port.
MTTY_HEADER_BYTES = 8 + 4 + 4 + 4 + 4
MTTY_PORT_BYTES = 36


def mtty_stream_bytes(ports: int) -> int:
    return MTTY_HEADER_BYTES + ports * MTTY_PORT_BYTES


class Lab:
    """The guest: its lab directory and the modules the tests need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mtty_ko = root / "build" / "mtty" / "mtty.ko"

    def load_modules(self) -> None:
        for module in ("vfio", "vfio_iommu_type1", "mdev"):
            subprocess.run(["modprobe", module], check=True)
        if not MTTY_TYPES.exists():
            subprocess.run(["insmod", str(self.mtty_ko)], check=True)
        assert (MTTY_TYPES / "mtty-1").is_dir() and (MTTY_TYPES / "mtty-2").is_dir()


class Mdevs:
    """mtty devices made for one test; removed by :meth:`remove_all`."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.made: list[str] = []

    def create(self, mtty_type: str) -> str:
        """A new mtty device of ``mtty-1`` or ``mtty-2``; its UUID."""
        name = str(uuid.uuid4())
        (MTTY_TYPES / mtty_type / "create").write_text(name)
        self.made.append(name)
        return name

    def remove_all(self) -> None:
        for name in reversed(self.made):
            remove = MDEV_DEVICES / name / "remove"
            if remove.exists():
                remove.write_text("1")
        self.made.clear()


def iommu_group(mdev: str) -> int:
    return int((MDEV_DEVICES / mdev / "iommu_group").resolve().name)


class MttyHandle:
    """An mtty device opened through its group and a type1v2 container."""

    def __init__(self, mdev: str) -> None:
        self.mdev = mdev
        self.container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        try:
            self.group = os.open(f"/dev/vfio/{iommu_group(mdev)}", os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(self.container)
            raise
        try:
            container = struct.pack("=i", self.container)
            fcntl.ioctl(self.group, uapi.VFIO_GROUP_SET_CONTAINER, container)
            fcntl.ioctl(self.container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
            name = bytearray(mdev.encode() + b"\0")
            self.fd = int(fcntl.ioctl(self.group, uapi.VFIO_GROUP_GET_DEVICE_FD, name, True))
        except BaseException:
            os.close(self.group)
            os.close(self.container)
            raise
        self._bars: dict[int, uapi.RegionInfo] = {}

    def __enter__(self) -> MttyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self.group, self.container):
            os.close(fd)

    def bar(self, port: int) -> uapi.RegionInfo:
        if port not in self._bars:
            buf = uapi.region_info_request(uapi.VFIO_PCI_BAR0_REGION_INDEX + port)
            fcntl.ioctl(self.fd, uapi.VFIO_DEVICE_GET_REGION_INFO, buf, True)
            info = uapi.region_info_result(buf)
            assert info.size >= 8 and info.readable and info.writable, info
            self._bars[port] = info
        return self._bars[port]

    def read(self, port: int, register: int) -> int:
        return os.pread(self.fd, 1, self.bar(port).offset + register)[0]

    def write(self, port: int, register: int, value: int) -> None:
        assert os.pwrite(self.fd, bytes([value]), self.bar(port).offset + register) == 1

    def state(self) -> DeviceState:
        return device_state(self.fd)


def device_state(fd: int) -> DeviceState:
    """The migration state of the VFIO device open as ``fd``."""
    buf = uapi.mig_state_request(uapi.FeatureOp.GET)
    fcntl.ioctl(fd, uapi.VFIO_DEVICE_FEATURE, buf, True)
    return DeviceState(uapi.mig_state_result(buf)[0])


@dataclass(frozen=True)
class PortSetting:
    """What a test programs into one port, and so expects to read back."""

    scratch: int
    lcr: int
    ier: int
    mcr: int
    #: With a divisor, the port is left with DLAB set: offsets 0 and 1 read it back.
    divisor: int | None = None
    #: Bytes left waiting in the loopback FIFO (only without a divisor: DLAB hides it).
    fifo: bytes = b""


def program(handle: MttyHandle, port: int, setting: PortSetting) -> None:
    handle.write(port, UART_SCR, setting.scratch)
    handle.write(port, UART_IER, setting.ier)
    handle.write(port, UART_MCR, setting.mcr)
    if setting.divisor is not None:
        # Setting DLAB zeroes the divisor; its bytes are then OR-ed in.
        handle.write(port, UART_LCR, setting.lcr | LCR_DLAB)
        handle.write(port, UART_TX, setting.divisor & 0xFF)
        handle.write(port, UART_IER, setting.divisor >> 8)
    else:
        handle.write(port, UART_LCR, setting.lcr)
        for byte in setting.fifo:
            handle.write(port, UART_TX, byte)


def registers(handle: MttyHandle, port: int) -> dict[str, int]:
    """The registers reading does not change (the FIFO and divisor aside)."""
    return {
        "scratch": handle.read(port, UART_SCR),
        "lcr": handle.read(port, UART_LCR),
        "ier": handle.read(port, UART_IER) if not handle.read(port, UART_LCR) & LCR_DLAB else -1,
        "mcr": handle.read(port, UART_MCR),
        "lsr_data_ready": handle.read(port, UART_LSR) & LSR_DATA_READY,
    }


def expected_registers(setting: PortSetting) -> dict[str, int]:
    dlab = setting.divisor is not None
    return {
        "scratch": setting.scratch,
        "lcr": setting.lcr | (LCR_DLAB if dlab else 0),
        # mtty reads back the low nibble of IER.
        "ier": -1 if dlab else setting.ier & 0x0F,
        "mcr": setting.mcr,
        "lsr_data_ready": 1 if setting.fifo else 0,
    }


def check_port(handle: MttyHandle, port: int, setting: PortSetting) -> None:
    """Every part of ``setting`` reads back from ``handle``'s port (draining its FIFO)."""
    assert registers(handle, port) == expected_registers(setting), f"port {port}"
    if setting.divisor is not None:
        divisor = handle.read(port, UART_RX) | handle.read(port, UART_IER) << 8
        assert divisor == setting.divisor, f"port {port}: divisor {divisor:#x}"
    else:
        fifo = bytes(handle.read(port, UART_RX) for _ in setting.fifo)
        assert fifo == setting.fifo, f"port {port}: FIFO held {fifo!r}"
        assert not handle.read(port, UART_LSR) & LSR_DATA_READY, f"port {port}: FIFO not drained"


# --- running plans through the CLI ----------------------------------------------------


def vfio_device(name: str, source: str, destination: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "vfio",
        "source": {"mdev": source, **extra},
        "destination": {"mdev": destination, **extra},
    }


def write_plan(path: Path, devices: list[dict[str, Any]], **top: Any) -> Path:
    """A plan file in TOML, as an operator would write it."""
    lines = [f'vm = "{top.pop("vm", "lab-vm")}"']
    lines.append(f"downtime_limit_ms = {top.pop('downtime_limit_ms', 10000)}")
    for key, value in top.items():
        lines.append(f"{key} = {json.dumps(value)}")
    for device in devices:
        lines.append("")
        lines.append("[[devices]]")
        lines.append(f'name = "{device["name"]}"')
        lines.append(f'backend = "{device["backend"]}"')
        if "accept_differences" in device:
            lines.append(f"accept_differences = {json.dumps(device['accept_differences'])}")
        for side in ("source", "destination"):
            fields = ", ".join(f"{k} = {json.dumps(v)}" for k, v in device[side].items())
            lines.append(f"{side} = {{ {fields} }}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str

    def report(self) -> dict[str, Any]:
        try:
            data = json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(
                f"no JSON report (exit {self.returncode}): {exc}\nstderr:\n{self.stderr}"
            ) from None
        assert isinstance(data, dict)
        return data


def _command() -> list[str]:
    exe = shutil.which("orchestrator")
    return [exe] if exe else [sys.executable, "-m", "orchestrator"]


def _this_checkout(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with this checkout first on the import path: the venv's ``orchestrator``
    may be another checkout's editable install (a worktree shares its venv), whose
    code the command would run instead of the code under test."""
    root = str(Path(__file__).resolve().parents[2])
    rest = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": f"{root}{os.pathsep}{rest}" if rest else root}


def orchestrator(*args: str | Path, timeout: float = 120) -> RunResult:
    """``orchestrator ARGS`` as a user runs it."""
    proc = subprocess.run(
        [*_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=_this_checkout(os.environ),
    )
    return RunResult(proc.returncode, proc.stdout, proc.stderr)


# --- the daemon, and a VMM beside it -------------------------------------------------------

#: Starting a Python process costs about 14 s under TCG: a test module starts one daemon.
DAEMON_START_S = 180


class Daemon:
    """``orchestrator serve`` in the guest, with its API and handover sockets under ``root``.

    ``root`` must be short: Unix socket paths hold at most 107 bytes.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = "lab-" + uuid.uuid4().hex
        self.api_socket = root / "api.sock"
        self.handover_socket = root / "handover.sock"
        self.log = root / "daemon.log"
        self.config = root / "orchestrator.toml"
        tokens = root / "tokens"
        tokens.write_text(self.token + "\n")
        tokens.chmod(0o600)
        self.config.write_text(
            f'state_dir = "{root / "state"}"\n'
            f'handover_socket = "{self.handover_socket}"\n'
            "shutdown_grace_s = 10\n"
            f'[api]\nunix_socket = "{self.api_socket}"\ntoken_file = "{tokens}"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The lab's own ORCHESTRATOR_* variables would be read as settings (and refused).
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        env = _this_checkout(env)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*_command(), "--log-format", "json", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + DAEMON_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited {self.proc.returncode}:\n{self.logs()}")
            if self.api_socket.exists():
                with self.api() as api:
                    try:
                        if api.get("/readyz").status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
            time.sleep(0.2)
        raise AssertionError(f"the daemon was not ready in {DAEMON_START_S} s:\n{self.logs()}")

    def api(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.api_socket)),
            base_url="http://orchestrator",
            headers={"authorization": f"Bearer {self.token}"},
            timeout=60,
        )

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the daemon ignored SIGTERM:\n{self.logs()}") from None

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-20000:]

    def wait_outcome(self, api: httpx.Client, migration_id: str, timeout_s: float = 120) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = api.get(f"/v1/migrations/{migration_id}")
            assert response.status_code == 200, response.text
            status = response.json()
            if status["outcome"] is not None:
                return status
            time.sleep(0.1)
        raise AssertionError(f"migration {migration_id} did not end in {timeout_s} s")


_VMM_SCRIPT = """#!/bin/sh
# A VMM stand-in for a plan's [vmm] command: DIR VERB.  Its vCPUs are paused while
# DIR/paused exists.  "pause" waits for DIR/go, the test's gate: a migration is held
# there, in flight, for as long as the test wants.
dir=$1
case $2 in
    pause)
        : >"$dir/pausing"
        while [ ! -e "$dir/go" ]; do sleep 0.05; done
        : >"$dir/paused" ;;
    resume) rm -f "$dir/paused" ;;
    status) if [ -e "$dir/paused" ]; then echo paused; else echo running; fi ;;
    *) echo "unknown verb: $2" >&2; exit 2 ;;
esac
"""


def vmm_stand_in(directory: Path, *, running: bool) -> list[str]:
    """A plan's ``[vmm]`` command for one side: a VM whose vCPUs run or are paused."""
    directory.mkdir(parents=True)
    script = directory / "vmm.sh"
    script.write_text(_VMM_SCRIPT)
    if not running:
        (directory / "paused").touch()
    return ["/bin/sh", str(script), str(directory)]


def wait_for(path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout_s} s"
        time.sleep(0.05)
