"""The limits an operator may change while a migration is in pre-copy, as the engine applies them.

:class:`LiveControl` holds the limits in force (an ``orchestrator.control.Control``)
for one migration and puts each change to work at once: a new bandwidth cap
on the migration's rate limiter (senders already waiting included), a new
downtime limit at the next pre-copy decision (``PrecopyRounds`` reads it
there), and a forced switchover by ending the round in flight, as the
pre-copy deadline does.  Which phases accept a change is the coordinator's
to say (``Migration.control``); this class only applies what was accepted.
"""

from __future__ import annotations

import trio

from orchestrator.control import Control, initial
from orchestrator.plan import Plan
from orchestrator.transport import RateLimiter

__all__ = ["LiveControl"]

MIB = 1 << 20


class LiveControl:
    """The limits in force for one migration; see the module docstring."""

    def __init__(self, plan: Plan, limiter: RateLimiter) -> None:
        self.state = initial(plan)
        self._limiter = limiter
        # The pre-copy rounds' cut, once they began.
        self._cut: trio.Event | None = None

    def attach(self, cut: trio.Event) -> None:
        """Pre-copy begins: ``cut`` ends the round in flight.  A switchover forced
        before (in prepare) ends the first round at once."""
        self._cut = cut
        if self.state.switchover_forced:
            cut.set()

    def apply(self, control: Control) -> None:
        """Put ``control`` in force."""
        rate = control.bandwidth_limit_mib_s
        if rate != self.state.bandwidth_limit_mib_s:
            # The limiter first: a rate it refuses leaves the limits as they were.
            self._limiter.set_rate(None if rate is None else rate * MIB)
        self.state = control
        if control.switchover_forced and self._cut is not None:
            self._cut.set()
