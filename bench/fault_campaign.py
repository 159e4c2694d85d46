"""A fault campaign: two daemons, randomized crashes and link cuts, and the invariants after.

Each trial starts two ``orchestrator serve`` processes with fresh state
directories, a source and a destination (both with a TCP API, so that the
destination can ask the source how a migration ended, and a data listener),
submits to the source a plan of 1 to 4 simulated devices drawn at random
(sizes, dirty rates, arc latencies, capabilities, bandwidth, downtime limit,
with or without a VMM), and strikes once:

* ``kill``: SIGKILL of the source, the destination or both, at a random
  moment: a random delay after the submission, the source reaching a phase
  (its status, polled), or the first or every device of one side reaching a
  state (read from the device files, which the simulated devices keep in
  each daemon's state directory as hardware outlives its driver), then a
  random extra delay; what was killed is restarted after a random pause;
* ``cut`` (network namespaces joined by a veth pair, which needs root and
  ``ip netns``): the link set down at such a moment, and up again after a
  random time;
* ``cut+kill`` (mode ``both``, with the other two): a kill and restart
  while the link is cut.

It then waits until both journals hold an outcome for the migration (the
destination's only if it ever heard of it), with a generous deadline: a
migration without one by then, both daemons running and the link up, is
``stuck``.  Both daemons are stopped, and the invariants are checked on what
they persisted: the device files, the vCPU files of the stand-in VMM, the
two SQLite journals.  The violations it looks for:

* ``both_running``: a source device or the source's vCPUs running while a
  destination device runs with the VM's state, or the destination's vCPUs run;
* ``neither_running``: neither side has every device RUNNING with the VM's
  state (and its vCPUs running): the source's own state, untouched, or on
  the destination the state the source had when it stopped;
* ``wrong_side``: the VM runs on one side only, the other than the outcome says;
* ``not_reset``: after a rollback, a destination device left neither reset
  nor as it was;
* ``journals_disagree``: the journals' outcomes or commit flags differ;
* ``journal_missing``: the migration is not in the source's journal, or not
  in the destination's when the destination showed it (its API) or moved a
  device for it;
* ``device_locked``: a device still held by a migration (``/v1/devices``,
  an unfinished journal record, a device file still locked once both
  daemons are stopped);
* ``device_unreadable``: a device file the simulator refuses to open;
* ``stuck``: no outcome by the deadline;
* ``daemon_exited``: a daemon exited that was not killed, did not come back
  ready, or did not stop on SIGTERM;
* ``harness_error``: the campaign itself failed in a trial (a bug here, not
  in the daemons; the trial is listed with its traceback).

A ``failed`` outcome (an operator is needed) is counted, not a violation;
only ``both_running`` and the journals are checked for it.

The table counts trials, the fault struck and the phase the source was in
when it struck, outcomes, and violations by kind; every trial with a
violation is listed with the command that replays it (``--trial``: the same
draws; timing is the machine's) and its directory is kept, daemon logs
included.  Exit status: 0, no violation; 1, violations; 3, mode ``cut``
where namespaces cannot be made (the reason is printed).

    python bench/fault_campaign.py --trials 200 --seed 1 [--mode kill|cut|both] [--quick]
        [--trial K] [--keep] [--deadline S]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import platform
import random
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
import trio

from orchestrator.backends.simulated import (
    _H_STATE,
    FILE_MAGIC,
    SimulatedBackend,
    SimulatedParams,
    _Layout,
    _StateFile,
    reference_digest,
)
from orchestrator.backends.simulated.content import _PageDigests
from orchestrator.flow import Phase
from orchestrator.journal import FILENAME as JOURNAL_FILENAME
from orchestrator.plan import parse_plan
from orchestrator.resolve import ResolvedPlan, resolve
from orchestrator.states import RUNNING_STATES, DeviceState, Side

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "campaign-" + secrets.token_hex(16)

Role = Literal["source", "destination"]
FaultKind = Literal["kill", "cut", "cut+kill"]
ROLES: tuple[Role, Role] = ("source", "destination")
SIDES: dict[Role, Side] = {"source": Side.SOURCE, "destination": Side.DESTINATION}
DIRS: dict[Role, str] = {"source": "src", "destination": "dst"}
OUTCOMES = ("succeeded", "rolled_back", "refused", "failed")
VIOLATIONS = (
    "both_running",
    "neither_running",
    "wrong_side",
    "not_reset",
    "journals_disagree",
    "journal_missing",
    "device_locked",
    "device_unreadable",
    "stuck",
    "daemon_exited",
    "harness_error",
)
#: Phases in the order a migration takes them; a trigger on one fires at it or any later.
PHASES = [p.value for p in Phase]
_S = DeviceState
#: How far a device is along its way, from the states seen of it: a device
#: trigger waits for a milestone, reached or passed (a state may be too brief
#: to be seen).  Per side: (state, least milestone before it) -> milestone.
#: A state that comes twice on the way (the destination's STOP and RUNNING_P2P
#: before and after its load, the source's STOP without pre-copy and after
#: stop-copy) is told apart by the milestone already reached.
MILESTONES: dict[Role, dict[tuple[DeviceState, int], int]] = {
    "source": {
        (_S.PRE_COPY, 0): 1, (_S.RUNNING_P2P, 0): 1, (_S.PRE_COPY_P2P, 0): 2,
        (_S.STOP, 0): 2, (_S.STOP_COPY, 0): 3, (_S.STOP, 3): 4,
    },
    "destination": {
        (_S.RUNNING_P2P, 0): 1, (_S.STOP, 0): 1, (_S.RESUMING, 0): 2, (_S.STOP, 2): 3,
        (_S.RUNNING_P2P, 2): 4, (_S.RUNNING, 2): 5,
    },
}  # fmt: skip
#: The milestones a trigger may wait for, by name.
DEVICE_TRIGGERS: dict[str, dict[str, int]] = {
    "source": {"PRE_COPY": 1, "PRE_COPY_P2P": 2, "STOP_COPY": 3, "STOP": 4},
    "destination": {"RESUMING": 2, "STOP": 3, "RUNNING_P2P": 4, "RUNNING": 5},
}
#: The stand-in VMM: the vCPUs' state is a word in a file, kept across daemon crashes.
VMM_SCRIPT = """\
#!/bin/sh
# The fault campaign's VMM: $1 holds the vCPUs' state, $2 is the verb.
case "$2" in
  pause) echo paused > "$1.new" && mv "$1.new" "$1" ;;
  resume) echo running > "$1.new" && mv "$1.new" "$1" ;;
  status) cat "$1" ;;
  *) echo "unknown verb $2" >&2; exit 2 ;;
esac
"""

#: A recovery slower than this (seconds from the repair to both outcomes) is counted.
SLOW_SETTLE_S = 30.0

#: Every daemon process alive, so that nothing outlives the campaign.
_LIVE: set[trio.Process] = set()


# -- what a trial does ----------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """The one fault a trial strikes, and how it is repaired."""

    kind: FaultKind
    victims: tuple[Role, ...]
    #: ("time",), ("phase", name) or ("device", role, state name, "first" | "all").
    trigger: tuple[str, ...]
    delay_s: float
    #: Per victim, the pause before it is restarted.
    restart_s: tuple[float, ...]
    cut_s: float = 0.0
    #: cut+kill: how long into the cut the kill comes.
    kill_after_s: float = 0.0

    def label(self) -> str:
        """The fault's row in the table."""
        if self.kind == "cut":
            return "cut"
        who = "both" if len(self.victims) == 2 else self.victims[0]
        return f"{self.kind} {who}"

    def describe(self) -> str:
        when = {"time": "at", "phase": "at phase", "device": "when"}[self.trigger[0]]
        what = " ".join(self.trigger[1:]) if len(self.trigger) > 1 else ""
        text = f"{self.label()} {when} {what} +{self.delay_s:.3f}s".replace("  ", " ")
        if self.kind != "cut":
            pauses = ", ".join(
                f"{v} {s:.2f}s" for v, s in zip(self.victims, self.restart_s, strict=True)
            )
            text += f", restart after {pauses}"
        if self.kind != "kill":
            text += f", link down {self.cut_s:.2f}s"
        if self.kind == "cut+kill":
            text += f" (kill {self.kill_after_s:.2f}s into it)"
        return text


@dataclass(frozen=True)
class Trial:
    index: int
    plan: dict[str, Any]
    vmm: bool
    fault: Fault
    #: A rough duration of the migration unharmed, for "time" triggers and deadlines.
    estimate_s: float

    @property
    def device_names(self) -> list[str]:
        return [d["name"] for d in self.plan["devices"]]


def draw_trial(seed: int, index: int, mode: str, quick: bool) -> Trial:
    """Trial ``index`` of campaign ``seed``: the same draws whenever it is replayed."""
    rng = random.Random(f"fault-campaign/{seed}/{index}")
    n = rng.randint(1, 2 if quick else 4)
    # Slow enough links that a fault lands in the middle of a migration more often
    # than after it: pre-copy takes a second or a few.
    sizes = [0.5, 1, 2, 4] if quick else [0.5, 1, 2, 4, 8, 16]
    arcs_ms = [0, 1, 5, 20, 50] if quick else [0, 1, 5, 20, 50, 150]
    bandwidth = rng.choice([4, 8, 16] if quick else [4, 8, 16, 32, None])
    no_p2p = rng.randrange(n) if rng.random() < 0.2 else -1
    devices: list[dict[str, Any]] = []
    for i in range(n):
        source: dict[str, Any] = {
            "state_mib": rng.choice(sizes),
            "dirty_mib_s": rng.choice([0, 0, 0.25, 0.5, 1]),
            "transition_ms": rng.choice(arcs_ms),
            "seed": rng.randrange(1, 1 << 62),
        }
        if rng.random() < 0.15:
            source["pre_copy"] = False
        if i == no_p2p:
            source["p2p"] = False
        destination = {"transition_ms": rng.choice(arcs_ms)}
        devices.append(
            {"name": f"dev{i}", "backend": "simulated", "source": source,
             "destination": destination}
        )  # fmt: skip
    plan: dict[str, Any] = {
        "vm": f"vm-campaign-{index}",
        # Mostly migrations that would succeed unharmed; some that give up on their own.
        "downtime_limit_ms": rng.choice([100, 300, 1000, 3000]),
        "precopy_policy": "abort" if rng.random() < 0.25 else "switchover",
        "precopy_max_rounds": rng.choice([5, 10, 30]),
        "timeouts": {"device_call_s": rng.choice([4, 10])},
        "devices": devices,
    }
    if bandwidth is not None:
        plan["bandwidth_limit_mib_s"] = bandwidth
    if rng.random() < 0.3:
        plan["parallel_connections"] = rng.choice([1, 2])
    if no_p2p >= 0 and n > 1:
        plan["p2p"] = False  # a device without P2P states among others needs it said
    vmm = rng.random() < 0.6
    state = sum(d["source"]["state_mib"] for d in devices)
    slowest_arc = max(
        max(d["source"]["transition_ms"], d["destination"]["transition_ms"]) for d in devices
    )
    estimate = 0.5 + state / (bandwidth or 200) + 8 * slowest_arc / 1000

    kinds: dict[str, list[FaultKind]] = {
        "kill": ["kill"], "cut": ["cut"], "both": ["kill", "cut", "cut+kill"]
    }  # fmt: skip
    kind = rng.choice(kinds[mode])
    victims: tuple[Role, ...] = ()
    if kind != "cut":
        victims = rng.choice([("source",), ("destination",), ("source", "destination")])
    roll = rng.random()
    # After a trigger, no delay, a short one, or (early on) one of the order of pre-copy.
    delays = [0.0, rng.uniform(0, 0.02), rng.uniform(0, 0.2)]
    if roll < 0.3:
        trigger: tuple[str, ...] = ("time",)
        delay = rng.uniform(0, estimate)
    elif roll < 0.65:
        trigger = ("phase", rng.choice([*PHASES[:-2], "done"]))
        if trigger[1] in ("prepare", "precopy"):
            delays.append(rng.uniform(0, estimate))
        delay = rng.choice(delays)
    else:
        side = rng.choice(ROLES)
        state_name = rng.choice(list(DEVICE_TRIGGERS[side]))
        trigger = ("device", side, state_name, rng.choice(["first", "all"]))
        if state_name == "PRE_COPY":
            delays.append(rng.uniform(0, estimate))
        delay = rng.choice(delays)
    longest_pause = 1.0 if quick else 4.0
    restart = tuple(
        rng.choice([0.0, rng.uniform(0, 1.0), rng.uniform(0, longest_pause)]) for _ in victims
    )
    cut_s = kill_after = 0.0
    if kind != "kill":
        cut_s = rng.uniform(0.2, 3.0) if quick or rng.random() < 0.5 else rng.uniform(3.0, 20.0)
    if kind == "cut+kill":
        kill_after = rng.uniform(0, cut_s)
    fault = Fault(kind, victims, trigger, delay, restart, cut_s, kill_after)
    return Trial(index, plan, vmm, fault, estimate)


# -- where the daemons live -----------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _must(*argv: str) -> None:
    out = _run(*argv)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: {out.stderr.strip()}")


def why_no_netns() -> str | None:
    """Why two network namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need the ip command (iproute2)"
    probe = f"campaign-probe-{secrets.token_hex(3)}"
    out = _run("ip", "netns", "add", probe)
    if out.returncode != 0:
        return f"ip netns add failed: {out.stderr.strip()}"
    _run("ip", "netns", "del", probe)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Network:
    """Both daemons on the loopback: nothing to cut."""

    kind = "loopback"

    def __init__(self) -> None:
        self.ports = {role: _free_port() for role in ROLES}

    def address(self, role: Role) -> str:
        return "127.0.0.1"

    def port(self, role: Role) -> int:
        return self.ports[role]

    def argv(self, role: Role, argv: list[str]) -> list[str]:
        return argv

    def cut(self) -> None:
        raise RuntimeError("the loopback cannot be cut")

    def restore(self) -> None:
        raise RuntimeError("the loopback cannot be cut")

    def close(self) -> None:
        pass


class Namespaces(Network):
    """Each daemon in its own network namespace, the two joined by a veth pair."""

    kind = "namespaces"
    ADDRESSES: ClassVar[dict[Role, str]] = {"source": "10.233.0.1", "destination": "10.233.0.2"}

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.names: dict[Role, str] = {"source": f"fc-src-{tag}", "destination": f"fc-dst-{tag}"}
        self.link: dict[Role, str] = {"source": f"fcs{tag}", "destination": f"fcd{tag}"}
        self.is_cut = False
        steps: list[tuple[str, ...]] = [
            ("ip", "netns", "add", self.names["source"]),
            ("ip", "netns", "add", self.names["destination"]),
            ("ip", "link", "add", self.link["source"], "type", "veth",
             "peer", "name", self.link["destination"]),
        ]  # fmt: skip
        for role in ROLES:
            steps.append(("ip", "link", "set", self.link[role], "netns", self.names[role]))
        for role in ROLES:
            steps += [
                self._in(role, "ip", "addr", "add", f"{self.ADDRESSES[role]}/24",
                         "dev", self.link[role]),
                self._in(role, "ip", "link", "set", self.link[role], "up"),
                self._in(role, "ip", "link", "set", "lo", "up"),
            ]  # fmt: skip
        try:
            for step in steps:
                _must(*step)
        except BaseException:
            self.close()
            raise

    def _in(self, role: Role, *argv: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[role], *argv)

    def address(self, role: Role) -> str:
        return self.ADDRESSES[role]

    def port(self, role: Role) -> int:
        return 7800

    def argv(self, role: Role, argv: list[str]) -> list[str]:
        return list(self._in(role, *argv))

    def _link(self, updown: str) -> None:
        _must(*self._in("source", "ip", "link", "set", self.link["source"], updown))

    def cut(self) -> None:
        self._link("down")
        self.is_cut = True

    def restore(self) -> None:
        self._link("up")
        self.is_cut = False

    def close(self) -> None:
        for name in self.names.values():
            _run("ip", "netns", "del", name)


# -- the daemons ----------------------------------------------------------------------------


class DaemonGone(Exception):
    """A daemon exited, or never became ready."""


class Daemon:
    """One ``orchestrator serve`` of a trial, restartable on the same state directory."""

    def __init__(self, role: Role, base: Path, net: Network, token_file: Path) -> None:
        self.role = role
        self.base = base
        self.net = net
        base.mkdir()
        self.state_dir = base / "state"
        self.socket = base / "api.sock"
        self.log = base / "daemon.log"
        self.config = base / "orchestrator.toml"
        address = net.address(role)
        lines = [
            f'state_dir = "{self.state_dir}"',
            "shutdown_grace_s = 2",
            "[api]",
            f'unix_socket = "{self.socket}"',
            f'token_file = "{token_file}"',
            # Both hosts alike: the source's API answers the destination's questions.
            f'tcp = "{address}:{net.port(role)}"',
            "[data]",
            f'listen = "{address}:0"',
            # Network namespaces of this one machine: cleartext by choice.
            "insecure = true",
        ]
        self.config.write_text("\n".join(lines) + "\n")
        self.process: trio.Process | None = None
        self.starts = 0
        self.killed = False
        self._client: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        return f"http://{self.net.address(self.role)}:{self.net.port(self.role)}"

    @property
    def client(self) -> httpx.AsyncClient:
        """One client for the trial: making one takes tens of milliseconds (its TLS
        context), which would make the status polls stale.  It reconnects by itself
        once a restarted daemon listens again."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                base_url="http://orchestrator",
                headers={"authorization": f"Bearer {TOKEN}"},
                timeout=10,
            )
        return self._client

    async def start(self) -> None:
        self.starts += 1
        with self.log.open("a") as log:
            log.write(f"--- fault campaign: start {self.starts} at {time.time():.3f} ---\n")
        argv = [sys.executable, "-m", "orchestrator", "--log-format", "json", "serve",
                "--config", str(self.config)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        env["PYTHONPATH"] = str(ROOT)
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                self.net.argv(self.role, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        _LIVE.add(self.process)
        self.killed = False
        with trio.move_on_after(90):
            while True:
                if self.process.returncode is not None:
                    raise DaemonGone(f"{self.role} exited {self.process.returncode} on start")
                with contextlib.suppress(httpx.TransportError):
                    if (await self.client.get("/readyz")).status_code == 200:
                        return
                await trio.sleep(0.05)
        raise DaemonGone(f"{self.role} not ready 90 s after start {self.starts}")

    def kill(self) -> None:
        assert self.process is not None
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)

    async def reap(self) -> None:
        assert self.process is not None
        await self.process.wait()
        _LIVE.discard(self.process)

    def exited(self) -> str | None:
        """Why this daemon is gone though nobody killed it, if it is."""
        if self.process is None or self.killed or self.process.returncode is None:
            return None
        return f"{self.role} daemon exited {self.process.returncode} (start {self.starts})"

    async def stop(self) -> str | None:
        """SIGTERM and wait; what went wrong, if it did not exit 0 in time."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        process = self.process
        if process is None or process.returncode is not None:
            return None
        process.terminate()
        with trio.move_on_after(30):
            await process.wait()
        _LIVE.discard(process)
        if process.returncode is None:
            process.kill()
            await process.wait()
            return f"{self.role} daemon did not stop within 30 s of SIGTERM"
        if process.returncode != 0:
            return f"{self.role} daemon exited {process.returncode} on SIGTERM"
        return None

    def log_tail(self, lines: int = 12) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def get(self, path: str) -> tuple[int, Any]:
        """(status code, JSON body) of a GET; (0, None) if the daemon did not answer."""
        try:
            response = await self.client.get(path)
        except httpx.TransportError:
            return 0, None
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None


# -- watching devices -----------------------------------------------------------------------


class DeviceWatch:
    """The state word of every device file, read without a lock (``pread``)."""

    def __init__(self, files: dict[tuple[Role, str], Path]) -> None:
        self.files = files
        self.fds: dict[tuple[Role, str], int] = {}
        #: The milestone each device reached (see MILESTONES), as far as seen.
        self.milestone: dict[tuple[Role, str], int] = dict.fromkeys(files, 0)

    def read(self) -> dict[tuple[Role, str], DeviceState | None]:
        states: dict[tuple[Role, str], DeviceState | None] = {}
        for key, path in self.files.items():
            states[key] = None
            if key not in self.fds:
                try:
                    self.fds[key] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
            fd = self.fds[key]
            head = os.pread(fd, 8 * (_H_STATE + 1), 0)
            if len(head) < 8 * (_H_STATE + 1) or head[: len(FILE_MAGIC)] != FILE_MAGIC:
                continue
            value = int.from_bytes(head[8 * _H_STATE :], sys.byteorder, signed=True)
            with contextlib.suppress(ValueError):
                state = states[key] = DeviceState(value)
                reached = self.milestone[key]
                steps = MILESTONES[key[0]]
                passed = [m for (s, since), m in steps.items() if s is state and since <= reached]
                self.milestone[key] = max([reached, *passed])
        return states

    def summary(self) -> str:
        """Each side's device states, now: ``source STOP_COPY,STOP_COPY``."""
        states = self.read()
        parts = []
        for role in ROLES:
            names = [
                "-" if s is None else s.name for (r, _), s in sorted(states.items()) if r == role
            ]
            parts.append(f"{role} {','.join(names)}")
        return "; ".join(parts)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


# -- the persisted state, read after both daemons stopped ----------------------------------


@dataclass(frozen=True)
class DeviceFacts:
    present: bool
    state: DeviceState | None = None
    mutations: int = 0
    resets: int = 0
    digest: str | None = None
    locked: bool = False
    problem: str | None = None

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def label(self) -> str:
        if not self.present:
            return "none"
        return "locked" if self.locked else self.state.name if self.state else "unreadable"


def device_file(state_dir: Path, side: Side, name: str) -> Path:
    """Where a daemon's simulated device lives (``SimulatedBackend.device_file``)."""
    return SimulatedBackend(state_dir).device_file(name, side)


def read_device(path: Path, side: Side, params: SimulatedParams) -> DeviceFacts:
    """What a device file holds, opened as the simulator opens it (its cut chunk undone)."""
    try:
        with path.open("rb") as f:
            magic = f.read(len(FILE_MAGIC))
    except FileNotFoundError:
        return DeviceFacts(present=False)
    if magic != FILE_MAGIC:  # a creation cut short: nobody ever used this device
        return DeviceFacts(present=False)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return DeviceFacts(present=True, locked=True, problem=f"{path} is still locked")
    finally:
        os.close(fd)  # the lock, if taken, goes with it
    try:
        state_file = _StateFile.open(path, side, params)
    except Exception as exc:
        return DeviceFacts(present=True, problem=f"{path}: {exc}")
    try:
        pages = _PageDigests(_Layout.of(params))
        pages.track(state_file.content, "hash")
        digest = pages.state_digest().hex()
        pages.view.release()
        return DeviceFacts(
            present=True,
            state=state_file.state,
            mutations=state_file.mutations,
            resets=state_file.resets,
            digest=digest,
        )
    finally:
        state_file.close()


def read_journal(state_dir: Path, migration_id: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The migration's row in a daemon's journal, and the ids of every unfinished one."""
    path = state_dir / JOURNAL_FILENAME
    if not path.exists():
        return None, []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(
            "SELECT outcome, committed, phase FROM migrations WHERE id = ?", (migration_id,)
        ).fetchone()
        unfinished = [r[0] for r in db.execute("SELECT id FROM migrations WHERE outcome IS NULL")]
    return (dict(row) if row is not None else None), unfinished


def read_vcpus(path: Path) -> str | None:
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    return None


@dataclass
class Violation:
    kind: str
    detail: str


@dataclass
class Observed:
    """What the APIs said during the trial."""

    source: dict[str, Any] | None = None
    destination: dict[str, Any] | None = None
    #: The destination's API showed the migration at some point.
    destination_knew: bool = False
    locks: dict[Role, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Persisted:
    """What the two daemons left behind for one migration, read once both stopped."""

    migration_id: str
    names: list[str]
    devices: dict[tuple[Role, str], DeviceFacts]
    #: Per device: the source's file holds the source's own state (as of its
    #: mutation count, never reset), or there is none (never opened: as it was).
    source_intact: dict[str, bool]
    #: Per device: the destination's file holds the source's state as of some
    #: mutation of the source's (the VM's state, or an older copy of it).
    destination_holds: dict[str, bool]
    #: ... and as of the source's last mutation: the VM's state as the source stopped it.
    destination_current: dict[str, bool]
    #: The vCPUs of each side's VMM, if the plan had one: "running" or "paused".
    vcpus: dict[Role, str | None]
    #: Each journal's row for the migration (outcome, committed, phase), if any.
    journals: dict[Role, dict[str, Any] | None]
    #: Each journal's unfinished migrations.
    unfinished: dict[Role, list[str]]

    def picture(self) -> str:
        def states(role: Role) -> str:
            return ",".join(self.devices[(role, n)].label for n in self.names)

        return (
            f"source devices {states('source')} vcpus {self.vcpus.get('source', '-')}; "
            f"destination devices {states('destination')} vcpus "
            f"{self.vcpus.get('destination', '-')}; source intact {self.source_intact}; "
            f"destination holds the VM's state {self.destination_holds} "
            f"as the source stopped it {self.destination_current}"
        )


def read_persisted(
    resolved: ResolvedPlan,
    migration_id: str,
    state_dirs: dict[Role, Path],
    vcpu_files: dict[Role, Path],
) -> Persisted:
    devices: dict[tuple[Role, str], DeviceFacts] = {}
    source_intact: dict[str, bool] = {}
    destination_holds: dict[str, bool] = {}
    destination_current: dict[str, bool] = {}
    for device in resolved.devices:
        name, params = device.name, device.source
        assert isinstance(params, SimulatedParams)
        for role in ROLES:
            role_params = params if role == "source" else device.destination
            assert isinstance(role_params, SimulatedParams)
            path = device_file(state_dirs[role], SIDES[role], name)
            devices[(role, name)] = read_device(path, SIDES[role], role_params)
        src, dst = devices[("source", name)], devices[("destination", name)]
        source_intact[name] = not src.present or (
            src.resets == 0 and src.digest == reference_digest(params, src.mutations)
        )
        destination_holds[name] = (
            dst.digest is not None
            and dst.resets == 0
            and dst.digest == reference_digest(params, dst.mutations)
        )
        destination_current[name] = (
            destination_holds[name] and src.present and dst.mutations == src.mutations
        )
    journals: dict[Role, dict[str, Any] | None] = {}
    unfinished: dict[Role, list[str]] = {}
    for role in ROLES:
        journals[role], unfinished[role] = read_journal(state_dirs[role], migration_id)
    return Persisted(
        migration_id,
        [d.name for d in resolved.devices],
        devices,
        source_intact,
        destination_holds,
        destination_current,
        {role: read_vcpus(path) for role, path in vcpu_files.items()},
        journals,
        unfinished,
    )


def _outcome(row: dict[str, Any] | None) -> str | None:
    return None if row is None else row["outcome"]


def judge(left: Persisted, observed: Observed) -> list[Violation]:
    """The invariants, on what the daemons persisted and what their APIs said."""
    out: list[Violation] = []
    names, devices, vcpus = left.names, left.devices, left.vcpus
    src = [devices[("source", n)] for n in names]
    dst = [devices[("destination", n)] for n in names]
    holds = [left.destination_holds[n] for n in names]
    picture = left.picture()

    # A source device never opened is where it was: running.
    source_whole = (
        all(not d.present or d.state is DeviceState.RUNNING for d in src)
        and all(left.source_intact.values())
        and vcpus.get("source") != "paused"
    )
    source_part = any(not d.present or d.running for d in src) or vcpus.get("source") == "running"
    destination_whole = (
        all(d.state is DeviceState.RUNNING for d in dst)
        and all(left.destination_current.values())
        and vcpus.get("destination") != "paused"
    )
    destination_part = (
        any(d.running and h for d, h in zip(dst, holds, strict=True))
        or vcpus.get("destination") == "running"
    )
    if source_part and destination_part:
        out.append(Violation("both_running", picture))

    outcome = _outcome(left.journals["source"])
    if outcome in ("succeeded", "rolled_back", "refused"):
        expected_whole = destination_whole if outcome == "succeeded" else source_whole
        other_whole = source_whole if outcome == "succeeded" else destination_whole
        if not source_whole and not destination_whole:
            out.append(Violation("neither_running", f"outcome {outcome}: {picture}"))
        elif not expected_whole and other_whole and not (source_part and destination_part):
            out.append(Violation("wrong_side", f"outcome {outcome}: {picture}"))
        if outcome != "succeeded" and any(
            d.present and d.state is not DeviceState.RUNNING for d in dst
        ):
            out.append(Violation("not_reset", f"outcome {outcome}: {picture}"))

    for d in [*src, *dst]:
        if d.locked:
            out.append(Violation("device_locked", d.problem or ""))
        elif d.problem:
            out.append(Violation("device_unreadable", d.problem))
    for role, held in observed.locks.items():
        if held:
            out.append(Violation("device_locked", f"{role} /v1/devices: {', '.join(held)}"))
    for role, ids in left.unfinished.items():
        if ids:
            out.append(Violation("device_locked", f"{role} journal: unfinished {', '.join(ids)}"))

    src_row, dst_row = left.journals["source"], left.journals["destination"]
    if src_row is None:
        out.append(Violation("journal_missing", "the source's journal has no such migration"))
    moved = [
        n
        for n, d, h in zip(names, dst, holds, strict=True)
        if d.present and (d.state is not DeviceState.RUNNING or d.resets > 0 or h)
    ]
    if dst_row is None and (observed.destination_knew or moved):
        why = ["its API showed it"] if observed.destination_knew else []
        why += [f"devices {', '.join(moved)} moved"] if moved else []
        out.append(
            Violation(
                "journal_missing", f"the destination's journal has none, though {' and '.join(why)}"
            )
        )
    if src_row is not None and dst_row is not None:
        ends = [(row["outcome"], bool(row["committed"])) for row in (src_row, dst_row)]
        if ends[0] != ends[1]:
            out.append(
                Violation(
                    "journals_disagree",
                    f"source {ends[0][0]} committed={ends[0][1]}, destination {ends[1][0]} "
                    f"committed={ends[1][1]}",
                )
            )
    return out


# -- one trial ------------------------------------------------------------------------------


@dataclass
class TrialResult:
    index: int
    fault: Fault
    phase: str = "-"
    at_fault: str = ""
    outcome: str = "none"
    destination_outcome: str | None = None
    migration_id: str = ""
    seconds: float = 0.0
    #: From the repair (the restart, the link back) to both journals' outcomes.
    settle_s: float | None = None
    violations: list[Violation] = field(default_factory=list)
    directory: Path | None = None


class TrialRun:
    """One trial's daemons, its fault, its wait for the outcomes, and its checks."""

    def __init__(self, trial: Trial, base: Path, net: Network, deadline_s: float) -> None:
        self.trial = trial
        self.base = base
        self.net = net
        self.deadline_s = deadline_s
        token_file = base / "tokens"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        self.daemons: dict[Role, Daemon] = {
            role: Daemon(role, base / DIRS[role], net, token_file) for role in ROLES
        }
        self.plan = dict(trial.plan)
        self.plan["destination"] = {
            "url": self.daemons["destination"].url,
            "token_file": str(token_file),
        }
        self.vcpu_files: dict[Role, Path] = {}
        if trial.vmm:
            script = base / "vmm.sh"
            script.write_text(VMM_SCRIPT)
            self.plan["vmm"] = {}
            for role in ROLES:
                initial = "running" if role == "source" else "paused"
                vcpus = base / f"vcpus-{role}"
                vcpus.write_text(initial + "\n")
                self.vcpu_files[role] = vcpus
                self.plan["vmm"][role] = {"command": ["/bin/sh", str(script), str(vcpus)]}
        self.resolved = resolve(parse_plan(self.plan))
        self.watch = DeviceWatch(
            {
                (role, name): device_file(self.daemons[role].state_dir, SIDES[role], name)
                for name in trial.device_names
                for role in ROLES
            }
        )
        self.result = TrialResult(trial.index, trial.fault, directory=base)
        self.observed = Observed()
        #: The source's status as last polled before the fault.
        self.last_status: dict[str, Any] | None = None
        self.last_status_at = 0.0

    def _violation(self, kind: str, detail: str) -> None:
        self.result.violations.append(Violation(kind, detail))

    async def run(self) -> TrialResult:
        started = time.monotonic()
        source, destination = self.daemons["source"], self.daemons["destination"]
        try:
            await destination.start()
            await source.start()
            response = await source.client.post("/v1/migrations", json=self.plan)
            if response.status_code != 201:
                raise RuntimeError(f"submission refused: {response.status_code} {response.text}")
            self.result.migration_id = response.json()["id"]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_source)
                await self._wait_trigger()
                nursery.cancel_scope.cancel()
            await self._strike()
            await self._wait_outcomes()
            await self._look_at_locks()
        except DaemonGone as exc:
            self._violation("daemon_exited", f"{exc}")
        finally:
            self.watch.close()
            for daemon in self.daemons.values():
                problem = await daemon.stop()
                if problem is not None:
                    self._violation("daemon_exited", problem)
        if self.result.migration_id:
            self._check_persisted()
        self.result.seconds = time.monotonic() - started
        return self.result

    # -- the fault --------------------------------------------------------------------------

    async def _source_status(self) -> dict[str, Any] | None:
        code, body = await self.daemons["source"].get(f"/v1/migrations/{self.result.migration_id}")
        return body if code == 200 and isinstance(body, dict) else None

    async def _destination_status(self) -> dict[str, Any] | None:
        code, body = await self.daemons["destination"].get(
            f"/v1/incoming/{self.result.migration_id}"
        )
        if code == 200 and isinstance(body, dict):
            self.observed.destination_knew = True
            return body
        return None

    async def _watch_source(self) -> None:
        """Poll the source's status (and now and then the destination's) until cancelled."""
        polls = 0
        while True:
            asked = trio.current_time()
            status = await self._source_status()
            if status is not None:
                self.last_status, self.last_status_at = status, asked
            if polls % 5 == 0:
                await self._destination_status()
            polls += 1
            await trio.sleep(0.01)

    async def _wait_trigger(self) -> None:
        """Until the fault's moment: its trigger, then its delay (or the migration's end)."""
        fault = self.fault
        trigger = fault.trigger

        def ended() -> bool:
            return self.last_status is not None and self.last_status["outcome"] is not None

        with trio.move_on_after(max(30.0, 4 * self.trial.estimate_s)):
            if trigger[0] == "time":
                await trio.sleep(fault.delay_s)
                return
            while not ended():
                if trigger[0] == "phase":
                    status = self.last_status
                    if status is not None and PHASES.index(status["phase"]) >= PHASES.index(
                        trigger[1]
                    ):
                        break
                elif self._device_trigger(trigger):
                    break
                await trio.sleep(0.002)
        await trio.sleep(fault.delay_s)

    def _device_trigger(self, trigger: tuple[str, ...]) -> bool:
        _, role, state_name, how = trigger
        wanted = DEVICE_TRIGGERS[role][state_name]
        self.watch.read()
        hits = [m >= wanted for key, m in self.watch.milestone.items() if key[0] == role]
        return all(hits) if how == "all" else any(hits)

    @property
    def fault(self) -> Fault:
        return self.trial.fault

    def _note_the_moment(self) -> None:
        """Every device's state as the fault strikes, and the source's phase as last polled
        (a few milliseconds old at most: asking now would delay the fault)."""
        age_ms = (trio.current_time() - self.last_status_at) * 1000
        self.result.at_fault = f"{self.watch.summary()}; phase asked {age_ms:.0f} ms before"
        status = self.last_status
        if status is None:
            self.result.phase = "unknown"
        elif status["outcome"] is not None:
            self.result.phase = "ended"
        elif status["phase"] == "commit" and status["committed"]:
            self.result.phase = "commit (recorded)"
        else:
            self.result.phase = status["phase"]

    async def _strike(self) -> None:
        fault = self.fault
        self._note_the_moment()
        if fault.kind == "cut":
            self.net.cut()
            await trio.sleep(fault.cut_s)
            self.net.restore()
            return
        if fault.kind == "cut+kill":
            self.net.cut()
            await trio.sleep(fault.kill_after_s)
        victims = [self.daemons[v] for v in fault.victims]
        for daemon in victims:
            daemon.kill()
        for daemon in victims:
            await daemon.reap()

        async def restart(daemon: Daemon, pause: float) -> None:
            await trio.sleep(pause)
            await daemon.start()

        async def restore(after: float) -> None:
            await trio.sleep(after)
            self.net.restore()

        async with trio.open_nursery() as nursery:
            for daemon, pause in zip(victims, fault.restart_s, strict=True):
                nursery.start_soon(restart, daemon, pause)
            if fault.kind == "cut+kill":
                nursery.start_soon(restore, max(0.0, fault.cut_s - fault.kill_after_s))

    # -- the outcome ------------------------------------------------------------------------

    async def _wait_outcomes(self) -> None:
        repaired = trio.current_time()
        with trio.move_on_after(self.deadline_s):
            while True:
                for daemon in self.daemons.values():
                    why = daemon.exited()
                    if why is not None:
                        raise DaemonGone(f"{why}; its log ends:\n{daemon.log_tail()}")
                source = await self._source_status()
                destination = await self._destination_status()
                if source is not None:
                    self.observed.source = source
                if destination is not None:
                    self.observed.destination = destination
                if (
                    source is not None
                    and source["outcome"] is not None
                    and (destination is None or destination["outcome"] is not None)
                ):
                    self.result.settle_s = trio.current_time() - repaired
                    return
                await trio.sleep(0.2)
        source, destination = self.observed.source, self.observed.destination
        self._violation(
            "stuck",
            f"no outcome in both journals {self.deadline_s:g} s after the repair: source "
            f"{_brief(source)}, destination {_brief(destination)}",
        )

    async def _look_at_locks(self) -> None:
        # A lock goes just after the outcome is journaled: allow it a moment.
        with trio.move_on_after(5):
            while True:
                for role, daemon in self.daemons.items():
                    code, body = await daemon.get("/v1/devices")
                    held = body if code == 200 and isinstance(body, list) else []
                    self.observed.locks[role] = [
                        f"{d['device']} by {d['migration']}" for d in held if d["migration"]
                    ]
                if not any(self.observed.locks.values()):
                    return
                await trio.sleep(0.2)

    # -- the invariants ---------------------------------------------------------------------

    def _check_persisted(self) -> None:
        left = read_persisted(
            self.resolved,
            self.result.migration_id,
            {role: daemon.state_dir for role, daemon in self.daemons.items()},
            self.vcpu_files,
        )
        self.result.outcome = _outcome(left.journals["source"]) or "none"
        self.result.destination_outcome = _outcome(left.journals["destination"])
        self.result.violations += judge(left, self.observed)


def _brief(status: dict[str, Any] | None) -> str:
    if status is None:
        return "none"
    return (
        f"phase {status.get('phase')} outcome {status.get('outcome')} "
        f"committed {status.get('committed')}"
    )


# -- the campaign ---------------------------------------------------------------------------


@dataclass
class Campaign:
    seed: int
    mode: str
    quick: bool
    keep: bool
    deadline_s: float
    argv: list[str]
    netns: bool
    results: list[TrialResult] = field(default_factory=list)

    async def run_trial(self, index: int, total: int) -> TrialResult:
        trial = draw_trial(self.seed, index, self.mode, self.quick)
        base = Path(tempfile.mkdtemp(prefix=f"fc-{self.seed}-{index}-"))
        try:
            net: Network = Namespaces() if self.netns else Network()
            try:
                result = await TrialRun(trial, base, net, self.deadline_s).run()
            finally:
                net.close()
        except Exception:
            result = TrialResult(index, trial.fault, directory=base)
            result.violations.append(Violation("harness_error", traceback.format_exc()))
        kept = self.keep or bool(result.violations)
        if not kept:
            shutil.rmtree(base, ignore_errors=True)
            result.directory = None
        verdict = ", ".join(v.kind for v in result.violations) or "ok"
        print(
            f"trial {index} ({len(self.results) + 1}/{total}): {trial.fault.describe()}; "
            f"phase {result.phase} ({result.at_fault}); {result.outcome} in "
            f"{result.seconds:.1f} s: {verdict}",
            file=sys.stderr,
            flush=True,
        )
        return result


def _kill_leftovers() -> None:
    for process in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


def print_table(campaign: Campaign, wall_s: float, network: str) -> None:
    results = campaign.results
    print("command: python " + shlex.join(["bench/fault_campaign.py", *campaign.argv]))
    seconds = [r.seconds for r in results]
    print(
        f"# {platform.node()} kernel {platform.release()}, {os.cpu_count()} CPUs; {network}; "
        f"{len(results)} trials in {wall_s:.1f} s"
        + (
            f" (a trial: median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s)"
            if seconds
            else ""
        )
    )
    settled = sorted(r.settle_s for r in results if r.settle_s is not None)
    if settled:
        slow = sum(1 for s in settled if s > SLOW_SETTLE_S)
        median, p90 = statistics.median(settled), settled[int(0.9 * (len(settled) - 1))]
        print(
            f"# both outcomes journaled after the repair in: median {median:.1f} s, "
            f"p90 {p90:.1f} s, max {settled[-1]:.1f} s; {slow} trials over {SLOW_SETTLE_S:g} s"
            + (":" if slow else "")
        )
        if slow:
            print(
                "#   "
                + ", ".join(
                    f"{r.index} ({r.fault.label()}, {r.phase}, {r.settle_s:.0f} s)"
                    for r in results
                    if r.settle_s is not None and r.settle_s > SLOW_SETTLE_S
                )
            )
    columns = ["trials", *OUTCOMES, "no outcome", "with violations"]
    rule = "|---|" + "---:|" * len(columns)

    def table(label: str, groups: dict[str, list[TrialResult]]) -> None:
        print()
        print(f"| {label} | " + " | ".join(columns) + " |")
        print(rule)
        for name, group in groups.items():
            counts = Counter(r.outcome for r in group)
            cells = [len(group), *(counts[o] for o in (*OUTCOMES, "none"))]
            cells.append(sum(1 for r in group if r.violations))
            print(f"| {name} | " + " | ".join(map(str, cells)) + " |")

    faults = sorted({r.fault.label() for r in results})
    table(
        "fault",
        {
            **{f: [r for r in results if r.fault.label() == f] for f in faults},
            "all": results,
        },
    )
    order = [*PHASES, "ended", "unknown"]
    phases = sorted({r.phase for r in results}, key=lambda p: [*order, p].index(p.split()[0]))
    table("phase hit", {p: [r for r in results if r.phase == p] for p in phases})
    print()
    kinds = Counter(v.kind for r in results for v in {v.kind: v for v in r.violations}.values())
    print("| violation | trials |")
    print("|---|---:|")
    for kind in VIOLATIONS:
        print(f"| {kind} | {kinds[kind]} |")
    print(f"| total | {sum(1 for r in results if r.violations)} |")
    for r in results:
        if not r.violations:
            continue
        replay = ["bench/fault_campaign.py", "--seed", str(campaign.seed), "--mode", campaign.mode]
        replay += ["--trial", str(r.index), "--keep"] + (["--quick"] if campaign.quick else [])
        print()
        print(f"trial {r.index}: {r.fault.describe()}")
        print(f"  migration {r.migration_id}, phase hit {r.phase}, devices then: {r.at_fault}")
        print(f"  outcome: source {r.outcome}, destination {r.destination_outcome}")
        print(f"  replay: python {shlex.join(replay)}")
        print(f"  kept: {r.directory}")
        for v in r.violations:
            print(f"  {v.kind}: {v.detail}")


async def run_campaign(campaign: Campaign, indices: list[int]) -> None:
    for index in indices:
        campaign.results.append(await campaign.run_trial(index, len(indices)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="how many trials (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="the campaign's seed (default 1)")
    parser.add_argument(
        "--mode",
        choices=("kill", "cut", "both"),
        default="kill",
        help="kill: SIGKILL; cut: link cuts (network namespaces); both: kills, cuts, "
        "and kills during cuts (default kill)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller plans, shorter pauses")
    parser.add_argument("--trial", type=int, help="replay this one trial of the seed")
    parser.add_argument("--keep", action="store_true", help="keep every trial's directory")
    parser.add_argument(
        "--deadline", type=float, help="seconds after the repair for both outcomes (150; quick 90)"
    )
    args = parser.parse_args(argv)
    deadline = args.deadline or (90.0 if args.quick else 150.0)
    netns = False
    network = "both daemons on the loopback"
    if args.mode != "kill":
        why = why_no_netns()
        if why is None:
            netns = True
            network = "each daemon in a network namespace, joined by a veth pair"
        elif args.mode == "cut":
            print(f"fault campaign: skipped: link cuts need network namespaces: {why}")
            return 3
        else:
            print(f"# no link cuts: {why}; mode both runs kill trials on the loopback")
            args.mode = "kill"
    campaign = Campaign(args.seed, args.mode, args.quick, args.keep, deadline, argv, netns)
    indices = [args.trial] if args.trial is not None else list(range(args.trials))
    started = time.monotonic()
    try:
        trio.run(run_campaign, campaign, indices)
    finally:
        _kill_leftovers()
    print_table(campaign, time.monotonic() - started, network)
    return 1 if any(r.violations for r in campaign.results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
