"""The destination's share of a strict downtime budget, on its own clock.

Between hosts the source keeps the budget's clock (``engine.budget``).  The
destination's steps before its vote run on the destination's clock, so the
source hands it a :class:`Share` as durations from its receipt; the
destination's :class:`Allowance` checks each such step against it and raises
:class:`OverBudget` (reported back as durations, never timestamps) for a step
that cannot end within it, before the step begins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

__all__ = ["Allowance", "OverBudget", "Share"]


@dataclass(frozen=True)
class Share:
    """The destination's share of a strict budget, in durations from when it is sent."""

    #: Until its vote must reach the source, less the round trip.
    left_s: float
    #: Its settle arcs, as the source's model predicts them (the longest device's).
    settle_s: float


class OverBudget(Exception):
    """The destination refused a step that would not fit in its share of the budget."""

    def __init__(
        self, step: str, device: str | None, elapsed_s: float, need_s: float, left_s: float
    ) -> None:
        super().__init__(
            f"{step}{f' of {device}' if device else ''} needs {need_s * 1000:.1f} ms with "
            f"{(left_s - elapsed_s) * 1000:.1f} ms of the destination's share left"
        )
        self.step = step
        self.device = device
        #: Since the share was received (the destination's clock).
        self.elapsed_s = elapsed_s
        self.need_s = need_s
        self.left_s = left_s

    @property
    def over_s(self) -> float:
        return self.elapsed_s + self.need_s - self.left_s


class Allowance:
    """The destination's side of a strict budget: the share the source granted, on
    this host's clock from its receipt.  Ungranted (best effort, or one host, where
    the source's checks run on the same clock), every check passes."""

    def __init__(self) -> None:
        self.share: Share | None = None
        #: A share that came too late to be taken (see ``grant``).
        self.late: Share | None = None
        self._granted_at = 0.0
        #: Each check taken: (step, device, elapsed_s, need_s).
        self.checks: list[tuple[str, str | None, float, float]] = []

    def grant(self, share: Share, *, late: bool = False) -> None:
        """Take the share, its clock from now.  ``late``: a stream ended before it
        arrived (it came another way, or behind the data): its durations would
        count from too late a moment, so it is not taken (the source's own checks
        still hold)."""
        if self.share is not None or self.late is not None:
            return  # a repeated grant (a duplicate message) keeps the first clock
        if late:
            self.late = share
            return
        self.share = share
        self._granted_at = trio.current_time()

    def check(self, step: str, device: str | None = None) -> None:
        """Before ``step`` (``settle_arcs`` of a device, or the ``vote``): raise
        OverBudget when it cannot end within the share."""
        share = self.share
        if share is None:
            return
        elapsed = trio.current_time() - self._granted_at
        need = share.settle_s if step == "settle_arcs" else 0.0
        self.checks.append((step, device, elapsed, need))
        if elapsed + need > share.left_s:
            raise OverBudget(step, device, elapsed, need, share.left_s)

    def as_report(self) -> dict[str, Any] | None:
        share = self.share or self.late
        if share is None:
            return None
        return {
            "taken": self.share is not None,
            "left_ms": round(share.left_s * 1000, 3),
            "settle_ms": round(share.settle_s * 1000, 3),
            "checks": [
                {
                    "step": step,
                    "device": device,
                    "elapsed_ms": round(elapsed * 1000, 3),
                    "need_ms": round(need * 1000, 3),
                    "fits": elapsed + need <= share.left_s,
                }
                for step, device, elapsed, need in self.checks
            ],
        }
