"""The identity check: before any device leaves RUNNING, on one host or two.

Every source device's identity (read as it opens) against its destination's
(read by the destination half as it opens, on this host or in the destination
daemon's prepare answer), by the rules of ``orchestrator.compat``: the route's
needs, the plan's ``accept_differences``, the coordinating daemon's
``[compat]``.  A difference nothing accepts is the migration's cause
(``identity_mismatch``) and stops it before any change, so that it ends
``refused``; what was compared, accepted or not compared goes to the report.
"""

from __future__ import annotations

from orchestrator.compat import CompatSettings, Identity, Mismatch, compare_all, route_needs
from orchestrator.engine.destination import Destination
from orchestrator.engine.devices import EngineContext, MigrationAborted
from orchestrator.flow import MigrationFlow
from orchestrator.peer.messages import IDENTITIES_VERSION
from orchestrator.report import CompatibilityReport
from orchestrator.states import Side

__all__ = ["IdentityCheck"]


class IdentityCheck:
    """One migration's identity check; ``source`` is filled in as the devices open."""

    def __init__(self, ctx: EngineContext, compat: CompatSettings | None) -> None:
        self.ctx = ctx
        #: The coordinating daemon's ``[compat]``: differences the check accepts.
        self.compat = compat or CompatSettings()
        #: Each source device's identity, where its backend reports one.
        self.source: dict[str, Identity] = {}
        #: The check's record for the report (None until it ran).
        self.report: CompatibilityReport | None = None

    def check(self, flow: MigrationFlow, names: list[str], destination: Destination) -> None:
        """MigrationAborted (the cause kept) on a difference nothing accepts."""
        theirs = destination.identities()
        self.report = record = CompatibilityReport(
            checked=theirs is not None,
            policy=[rule.model_dump(exclude_none=True) for rule in self.compat.rules],
        )
        if theirs is None:
            destination.notes.append(
                "device identities were not compared: the destination daemon predates them "
                f"(protocol {IDENTITIES_VERSION} and later report them)"
            )
            self.ctx.log.warning("migration.identities_unchecked")
            return
        accept = {spec.name: spec.accept_differences for spec in self.ctx.plan.devices}
        pairs = []
        absent: list[Mismatch] = []
        for name in names:
            src, dst = self.source.get(name), theirs.get(name)
            record.identities[name] = {
                "source": src.as_json() if src is not None else None,
                "destination": dst.as_json() if dst is not None else None,
            }
            if src is None and dst is None:
                continue  # a backend that reports none: the flow's checks are all there is
            if src is None or dst is None:
                # One end reported an identity, the other none: nothing proves a match.
                missing = "source" if src is None else "destination"
                absent.append(
                    Mismatch(name, "identity", None, None, f"the {missing} reported none")
                )
                continue
            route = flow.endpoint(Side.SOURCE, name).route
            needs = route_needs(precopy=route.precopy is not None, grace=route.grace is not None)
            pairs.append((name, src, dst, needs, accept.get(name, [])))
        verdict = compare_all(pairs, self.compat)
        verdict.mismatches[:0] = absent
        record.accepted = [a.as_json() for a in verdict.accepted]
        record.mismatches = [m.message for m in verdict.mismatches]
        record.not_compared = list(verdict.unknown)
        for accepted in verdict.accepted:
            self.ctx.log.info("migration.difference_accepted", **accepted.as_json())
        if verdict.mismatches:
            first = verdict.mismatches[0].device
            self.ctx.keep(self.ctx.info("identity_mismatch", verdict.message, device=first))
            raise MigrationAborted(verdict.message)
