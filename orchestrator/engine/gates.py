"""Where the device tasks of one migration meet: the barriers and the pre-copy rounds.

:class:`Switchover` bundles, for one forward path, every meeting point the
coordinator and the per-device tasks share: the round gate whose last report
decides the pre-copy, the signal to enter the grace states, the two P2P
barriers, the count of drained sources and the destination's run after the
commit.  Nothing here talks to a device.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from orchestrator.convergence import PrecopyDecision, Remaining

if TYPE_CHECKING:
    from orchestrator.engine.precopy import PrecopyRounds

__all__ = ["Barrier", "RoundGate", "Switchover", "each_to_its_end"]


async def each_to_its_end(calls: list[Callable[[], Awaitable[object]]]) -> None:
    """Run ``calls`` side by side, every one to its end, then raise the first
    failure in list order.

    For steps whose result the report needs from every device (opening,
    checking): one device's failure must not cancel another's answer, and
    which failure is reported must not depend on which came first.
    """
    failures: list[Exception | None] = [None] * len(calls)

    async def one(index: int) -> None:
        try:
            await calls[index]()
        except Exception as exc:
            failures[index] = exc

    async with trio.open_nursery() as nursery:
        for index in range(len(calls)):
            nursery.start_soon(one, index)
    for failure in failures:
        if failure is not None:
            raise failure


class Barrier:
    """``parties`` tasks meet; the last to arrive runs ``on_release`` before anyone goes on."""

    def __init__(self, name: str, parties: int, on_release: Callable[[], None]) -> None:
        self.name = name
        self.parties = parties
        self._on_release = on_release
        self._arrived = 0
        self.released = trio.Event()

    async def arrive(self) -> float:
        """Wait for every party; returns how long this one waited, in seconds."""
        start = trio.current_time()
        self._arrived += 1
        if self._arrived == self.parties:
            self._on_release()
            self.released.set()
        await self.released.wait()
        return trio.current_time() - start


class RoundGate:
    """A cyclic barrier for pre-copy rounds: the last report of a round decides for all."""

    def __init__(
        self,
        parties: int,
        decide: Callable[[dict[str, Remaining], dict[str, float]], PrecopyDecision],
    ):
        self.parties = parties
        #: Called by the last report of a round with every report and when each came.
        self._decide = decide
        self._reports: dict[str, Remaining] = {}
        self._reported_at: dict[str, float] = {}
        self._round_done = trio.Event()
        self.decision: PrecopyDecision | None = None
        #: Set once a round decides anything but "continue".
        self.final = trio.Event()

    async def arrive(self, name: str, remaining: Remaining) -> PrecopyDecision:
        self._reports[name] = remaining
        self._reported_at[name] = trio.current_time()
        done = self._round_done
        if len(self._reports) == self.parties:
            reports, self._reports = self._reports, {}
            reported_at, self._reported_at = self._reported_at, {}
            self._round_done = trio.Event()
            self.decision = self._decide(reports, reported_at)
            if self.decision.action != "continue":
                self.final.set()
            done.set()
        await done.wait()
        assert self.decision is not None
        return self.decision


@dataclass
class Switchover:
    """The meeting points of one forward path (see the module docstring)."""

    rounds: RoundGate
    #: What decides each round (and ends pre-copy at its deadline).
    precopy: PrecopyRounds
    source_barrier: Barrier
    destination_barrier: Barrier
    names: list[str]
    #: Set when the source devices may enter their grace states (the vCPUs paused).
    grace: trio.Event = field(default_factory=trio.Event)
    #: Where the VM has an ordered device (one without P2P among P2P peers): its
    #: peers meet here once in their grace states, and only then does it stop.
    peers_graced: Barrier | None = None
    #: Every source stream ended.
    all_drained: trio.Event = field(default_factory=trio.Event)
    #: QEMU before 10.0's order: one device stops and drains after another.
    sequential: trio.Lock = field(default_factory=trio.Lock)
    #: Per device: the destination loaded its stream and stands in its grace state.
    loaded: dict[str, trio.Event] = field(default_factory=dict)
    drained: int = 0

    def __post_init__(self) -> None:
        self.loaded = {name: trio.Event() for name in self.names}

    def drained_one(self) -> None:
        self.drained += 1
        if self.drained == len(self.names):
            self.all_drained.set()
