"""The pre-copy convergence decision, as a pure function: go on, switch over, or abort.

After each pre-copy round the runner reports what every source device still
has to send (``Remaining``); ``decide_precopy`` weighs it against the downtime
limit, the measured bandwidth, the rounds and the deadline, and the plan's
policy decides when no round can help.  It does no I/O and never waits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from orchestrator.plan import Plan

__all__ = ["PrecopyDecision", "Remaining", "decide_precopy"]


@dataclass(frozen=True)
class Remaining:
    """What one source device still has to send, as it reports it."""

    initial_bytes: int
    dirty_bytes: int
    stop_copy_bytes: int
    #: False for a device without PRE_COPY: its bytes never shrink before the stop.
    pre_copy: bool = True
    #: The device reported new initial data during this round, after its first
    #: had drained: the destination must acknowledge it before any device stops.
    initial_back: bool = False


@dataclass(frozen=True)
class PrecopyDecision:
    action: Literal["continue", "switchover", "abort"]
    reason: str
    #: Downtime the stop-copy would take at the measured bandwidth.
    expected_downtime_ms: float
    stop_copy_bytes: int
    converged: bool


def decide_precopy(
    plan: Plan,
    *,
    round_number: int,
    remaining: Mapping[str, Remaining],
    bandwidth_bytes_s: float,
    elapsed_s: float,
    predicted_ms: float | None = None,
    margin_ms: float = 0.0,
    floor_ms: float | None = None,
    downtime_limit_ms: float | None = None,
    forced: bool = False,
) -> PrecopyDecision:
    """After a pre-copy round: go on, switch over, or abort.

    Converged means every device drained its initial data (the device asks
    for that before a switchover), none reported new initial data during the
    round (``initial_back``: the next round's report, after the destination
    was asked to acknowledge it, decides), and the predicted downtime fits the
    limit:
    ``predicted_ms``, the whole window as the engine's model sees it, or (none
    given) the stop-copy bytes over the measured bandwidth, plus ``margin_ms``,
    how much longer the model says it may take.  Otherwise, after
    ``precopy_max_rounds`` rounds or the pre-copy deadline, or at once when no
    round can help (``floor_ms``, what the window takes whatever pre-copy still
    sends, exceeds the limit; or the devices without pre-copy alone do), the
    plan's policy decides.

    The limit is ``downtime_limit_ms`` when given (an operator changed it while
    pre-copy ran), else the plan's.  ``forced`` (an operator forced the
    switchover) makes the decision a switchover whatever the rest says; it
    is ``converged`` only if it would have been anyway.
    """
    stop_bytes = sum(r.stop_copy_bytes for r in remaining.values())
    if bandwidth_bytes_s > 0:
        bytes_ms = stop_bytes / bandwidth_bytes_s * 1000.0
    else:
        bytes_ms = 0.0 if stop_bytes == 0 else float("inf")
    expected_ms = predicted_ms if predicted_ms is not None else bytes_ms
    limit = plan.downtime_limit_ms if downtime_limit_ms is None else downtime_limit_ms
    budget_bytes = limit / 1000.0 * bandwidth_bytes_s
    initial_left = sorted(n for n, r in remaining.items() if r.pre_copy and r.initial_bytes > 0)
    initial_back = sorted(n for n, r in remaining.items() if r.pre_copy and r.initial_back)

    def decided(action: Literal["continue", "switchover", "abort"], reason: str) -> PrecopyDecision:
        return PrecopyDecision(action, reason, expected_ms, stop_bytes, converged=False)

    converged = not initial_left and not initial_back and expected_ms + margin_ms <= limit
    plus = f" (+{margin_ms:.0f} ms margin)" if margin_ms else ""
    if initial_back:
        why_not = f"new initial data came back on {', '.join(initial_back)} this round"
    elif initial_left:
        why_not = f"initial data not drained on {', '.join(initial_left)}"
    else:
        why_not = (
            f"the window is predicted at {expected_ms:.0f} ms{plus}, over the {limit:g} ms limit"
        )
    if forced:
        how = "it had converged" if converged else f"not converged: {why_not}"
        return PrecopyDecision(
            "switchover",
            f"switchover forced by the operator after {round_number} round(s) ({how})",
            expected_ms,
            stop_bytes,
            converged=converged,
        )
    if converged:
        return PrecopyDecision(
            "switchover",
            f"converged after {round_number} round(s): the window is predicted at "
            f"{expected_ms:.1f} ms{plus}, within {limit:g} ms ({stop_bytes} stop-copy bytes at "
            f"{bandwidth_bytes_s / 2**20:.1f} MiB/s)",
            expected_ms,
            stop_bytes,
            converged=True,
        )
    fixed = sum(r.stop_copy_bytes for r in remaining.values() if not r.pre_copy)
    if floor_ms is not None and floor_ms > limit:
        return decided(
            _policy(plan),
            f"cannot converge: the window takes at least {floor_ms:.0f} ms whatever pre-copy "
            f"still sends (its arcs, the devices without pre-copy, the commit, with the "
            f"model's margin), over the "
            f"{limit:g} ms limit; policy {plan.precopy_policy}",
        )
    if bandwidth_bytes_s > 0 and fixed > budget_bytes:
        stuck = "the devices without pre-copy alone need "
        stuck += f"{fixed / bandwidth_bytes_s * 1000:.0f} ms of stop-copy"
        return decided(_policy(plan), f"cannot converge: {stuck}; policy {plan.precopy_policy}")
    if not any(r.pre_copy for r in remaining.values()):
        # Nothing shrinks before the stop: more rounds would only wait.
        return decided(
            "switchover",
            f"no device has pre-copy: all {stop_bytes} bytes move in stop-copy",
        )
    if round_number >= plan.precopy_max_rounds:
        return decided(
            _policy(plan),
            f"not converged after {round_number} round(s) ({why_not}); "
            f"policy {plan.precopy_policy}",
        )
    if elapsed_s >= plan.timeouts.precopy_s:
        return decided(
            _policy(plan),
            f"not converged within the {plan.timeouts.precopy_s:g} s pre-copy deadline "
            f"({why_not}); policy {plan.precopy_policy}",
        )
    return decided("continue", why_not)


def _policy(plan: Plan) -> Literal["switchover", "abort"]:
    return "abort" if plan.precopy_policy == "abort" else "switchover"
