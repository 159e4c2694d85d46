"""The commit protocol between the source and the destination daemon, as pure state machines.

No I/O, no trio: the daemons feed each machine what happened (a message from
the peer, or an event of their own) and carry out the actions it returns.
Everything here can be driven by plain synchronous tests, and is, down to an
exhaustive exploration of both machines with a lossy network and crashes
(``tests/test_protocol_explore.py``).  The messages and their codec are in
``messages.py``.

Theory of operation
-------------------

A migration between two hosts is a two-phase commit with presumed abort.
The source daemon is the coordinator and the destination daemon the one
participant:

1. The source journals the migration, then prepares the destination (REST):
   the destination opens and checks its devices and journals the migration
   (``PREPARED``).  Until it votes it may abort on its own at any time.
2. ``Begin``: the destination devices walk to RESUMING and load their
   streams as they arrive; each arc is reported to the source.
3. Once every device stands loaded in its grace state the destination
   journals its vote, then sends ``Vote``.  From then on it may not decide
   alone: only the source's decision moves it.
4. The source journals the commit (the decision point), then sends
   ``Commit``.  The destination runs its devices and reports ``Completed``
   with its outcome, which is the migration's: after the commit the
   destination is the authority on how it ended.
5. Before the commit any failure on either side ends in an abort: the source
   rolls its devices back and sends ``Abort``; the destination resets its
   devices and reports ``RolledBack``.  The source is the authority on the
   outcome of an aborted migration (refused, rolled back or failed) and
   sends it as ``FinalOutcome``.

When the link is lost, or a daemon restarts, each side recovers from what
its own journal holds, and asks the other where it cannot decide alone:

* a destination that voted and has no decision is *in doubt*: it asks the
  source (``DecisionQuery``) with backoff.  The source answers from its
  journal, also after its own restart; an id it does not know was never
  committed (it journals a migration before its first call), so the answer
  is abort.  A source asked before it decided decides abort then and there;
  while its commit record is being written it answers ``pending``;
* a destination that rolled back asks the same way for the final outcome;
* a source that committed and lost the destination delivers the commit
  again (``Tick``) until it hears ``Completed``: it journals ``succeeded``
  or ``failed`` once, from the destination's answer, never a guess.

Invariants (checked by the exploration at every state it reaches):

* never both hosts running the VM;
* once both daemons run and can reach each other, both journals end with
  the same outcome and no device stays locked;
* every (state, message) pair has one defined result: accepted (the state
  may change and actions follow), ignored (a duplicate or a late message;
  nothing changes, though a reply may be sent again) or refused (a message
  the protocol forbids there; nothing changes and the peer is told why).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from orchestrator.peer.messages import (
    MESSAGES,
    PROTOCOL_VERSIONS,
    Abort,
    ArcReport,
    Begin,
    Budget,
    Commit,
    Completed,
    DecisionAnswer,
    DecisionQuery,
    FinalOutcome,
    InitialSent,
    Loaded,
    LoadFailed,
    MalformedMessage,
    Message,
    OverBudget,
    Refused,
    RolledBack,
    VcpusReport,
    Vote,
    decode,
    encode,
    negotiate_version,
)
from orchestrator.report import ErrorInfo, Outcome

__all__ = [
    "PROTOCOL_VERSIONS",
    "Abort",
    "Action",
    "AllReady",
    "ArcReport",
    "Begin",
    "Budget",
    "Commit",
    "CommitRecordFailed",
    "CommitRecorded",
    "Completed",
    "Deciding",
    "DecisionAnswer",
    "DecisionQuery",
    "DestinationMachine",
    "DestinationState",
    "DevicesRan",
    "DevicesReset",
    "FinalOutcome",
    "Finished",
    "InitialSent",
    "LinkLost",
    "LoadFailed",
    "Loaded",
    "LocalFailure",
    "MalformedMessage",
    "Message",
    "OverBudget",
    "PrepareAnswered",
    "Refused",
    "RolledBack",
    "SourceMachine",
    "SourceState",
    "Step",
    "Tick",
    "VcpusReport",
    "Vote",
    "VoteRecordFailed",
    "VoteRecorded",
    "decode",
    "encode",
    "negotiate_version",
]

# --------------------------------------------------------------------------
# Events of a daemon's own (never on the wire)


@dataclass(frozen=True, slots=True)
class PrepareAnswered:
    """Source: the destination prepared and answered."""


@dataclass(frozen=True, slots=True)
class LocalFailure:
    """Source: a failure, timeout or cancel before the commit: abort."""

    reason: str


@dataclass(frozen=True, slots=True)
class Deciding:
    """Source: every device reached the commit point; the commit record is being written."""


@dataclass(frozen=True, slots=True)
class CommitRecorded:
    """Source: the commit decision is durable."""


@dataclass(frozen=True, slots=True)
class CommitRecordFailed:
    """Source: the commit could not be recorded, so it was not decided."""

    reason: str


@dataclass(frozen=True, slots=True)
class Finished:
    """Source: the rollback is done; ``outcome`` is the migration's."""

    outcome: Outcome


@dataclass(frozen=True, slots=True)
class AllReady:
    """Destination: every device stands loaded in its grace state."""


@dataclass(frozen=True, slots=True)
class VoteRecorded:
    """Destination: the vote is durable."""


@dataclass(frozen=True, slots=True)
class VoteRecordFailed:
    """Destination: the vote could not be journaled: this side cannot vote."""

    reason: str


@dataclass(frozen=True, slots=True)
class DevicesRan:
    """Destination: after the commit, every device was driven to RUNNING (or failed to)."""

    outcome: Outcome
    errors: tuple[ErrorInfo, ...] = ()
    resume_s: float = 0.0


@dataclass(frozen=True, slots=True)
class DevicesReset:
    """Destination: every device that moved was reset (``errors``: those that were not)."""

    errors: tuple[ErrorInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class LinkLost:
    """Either side: the data channel to the peer is gone."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Tick:
    """Either side: the retry timer fired (backoff is the daemon's)."""


LocalEvent = (
    PrepareAnswered
    | LocalFailure
    | Deciding
    | CommitRecorded
    | CommitRecordFailed
    | Finished
    | AllReady
    | VoteRecorded
    | VoteRecordFailed
    | DevicesRan
    | DevicesReset
    | LinkLost
    | Tick
)
Event = Message | LocalEvent


# --------------------------------------------------------------------------
# Actions: what a machine asks its daemon to do, in order


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to the peer (over the channel, or over REST if it is gone)."""

    message: Message


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the request that carried the event (a REST query) with ``message``."""

    message: Message


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand a data-plane report (arc, loaded...) to whoever waits for it."""

    message: Message


class Do(enum.Enum):
    """Actions without arguments."""

    #: Source: roll the source devices back (or, on one host, both sides).
    ROLL_BACK = "roll_back"
    #: Source: journal the commit decision.
    RECORD_COMMIT = "record_commit"
    #: Source, restarted after its commit: stop and release the source devices.
    COMPLETE_SOURCE = "complete_source"
    #: Destination: walk every device to RESUMING and start loading.
    BEGIN_TRANSFER = "begin_transfer"
    #: Destination: journal the vote.
    RECORD_VOTE = "record_vote"
    #: Destination: journal the commit (beside running the devices).
    RECORD_COMMIT_HERE = "record_commit_here"
    #: Destination: run every device (and the vCPUs) to the end.
    RUN_DEVICES = "run_devices"
    #: Destination: reset every device that moved.
    RESET_DEVICES = "reset_devices"
    #: Destination: the devices are settled: free their locks.
    RELEASE = "release"
    #: Destination: ask the source for the decision or the outcome.
    QUERY = "query"


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """Journal the migration's final outcome on this side."""

    outcome: Outcome


Action = Send | Reply | Deliver | Do | RecordOutcome


@dataclass(frozen=True, slots=True)
class Step:
    """What one event did: ``accepted`` (the state may have changed and ``actions``
    follow), ``ignored`` (a duplicate or late event: the state is unchanged, though a
    reply may be repeated) or ``refused`` (forbidden here: unchanged, ``reason``)."""

    verdict: Literal["accepted", "ignored", "refused"]
    actions: tuple[Action, ...] = ()
    reason: str = ""


def _accept(*actions: Action) -> Step:
    return Step("accepted", tuple(actions))


def _ignore(reason: str, *actions: Action) -> Step:
    return Step("ignored", tuple(actions), reason)


def _refuse(reason: str) -> Step:
    return Step("refused", (), reason)


class _Machine:
    """Dispatch by (state, event type) through one table per side."""

    state: Any
    #: state -> event type -> handler.  A type missing for a state: ``_default``.
    TABLE: ClassVar[Mapping[Any, Mapping[type, Callable[[Any, Any], Step]]]]

    def handle(self, event: Event) -> Step:
        """Feed one event; the Step says what became of it.  Never raises."""
        if isinstance(event, Refused):
            # Never answered, or two daemons could refuse each other forever.
            return _ignore(f"the peer refused {event.message}: {event.reason}")
        handler = self.TABLE[self.state].get(type(event))
        if handler is None:
            return self._default(event)
        return handler(self, event)

    def _default(self, event: Event) -> Step:
        name = event.OP if isinstance(event, Message) else type(event).__name__
        return _refuse(f"{name} is not expected in state {self.state.value}")


# --------------------------------------------------------------------------
# The source (coordinator)


class SourceState(enum.Enum):
    PREPARING = "preparing"
    TRANSFER = "transfer"
    VOTED = "voted"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTING = "aborting"
    DONE = "done"


#: Data-plane reports: handed on while the transfer runs, ignored once it is over.
_REPORTS = (ArcReport, Loaded, LoadFailed)


@dataclass
class SourceMachine(_Machine):
    """The source daemon's side of one migration between two hosts."""

    state: SourceState = SourceState.PREPARING
    #: The final outcome, once journaled.
    outcome: Outcome | None = None
    #: The commit was recorded (it stays true once the migration is done).
    committed: bool = False
    #: The destination reported its rollback (``RolledBack``).
    destination_rolled_back: bool = False

    @classmethod
    def restarted(cls, *, committed: bool, outcome: Outcome | None) -> tuple[SourceMachine, Step]:
        """The machine of a daemon that restarted, from its journal, and what to do first."""
        if outcome is not None:
            return cls(SourceState.DONE, outcome, committed=committed), _accept()
        if committed:
            machine = cls(SourceState.COMMITTED, committed=True)
            return machine, _accept(Do.COMPLETE_SOURCE, Send(Commit()))
        # Presumed abort: not committed is not decided, and the source decides abort.
        return cls(SourceState.ABORTING), _accept(Do.ROLL_BACK, Send(Abort("the source restarted")))

    # -- handlers --

    def _answered(self, event: PrepareAnswered) -> Step:
        self.state = SourceState.TRANSFER
        return _accept(Send(Begin()))

    def _abort(self, event: LocalFailure | LinkLost | RolledBack) -> Step:
        self.state = SourceState.ABORTING
        if isinstance(event, RolledBack):
            self.destination_rolled_back = True
            return _accept(Do.ROLL_BACK, Deliver(event))
        reason = event.reason or "link lost"
        return _accept(Do.ROLL_BACK, Send(Abort(reason)))

    def _query_before_decision(self, event: DecisionQuery) -> Step:
        # Asked before it decided: the coordinator decides abort now.
        self.state = SourceState.ABORTING
        return _accept(
            Do.ROLL_BACK,
            Send(Abort("the destination asked for the decision before it was taken")),
            Reply(DecisionAnswer("abort")),
        )

    def _vote(self, event: Vote) -> Step:
        self.state = SourceState.VOTED
        return _accept(Deliver(event))

    def _report(self, event: Message) -> Step:
        return _accept(Deliver(event))

    def _deciding(self, event: Deciding) -> Step:
        self.state = SourceState.COMMITTING
        return _accept(Do.RECORD_COMMIT)

    def _recorded(self, event: CommitRecorded) -> Step:
        self.state = SourceState.COMMITTED
        self.committed = True
        return _accept(Send(Commit()))

    def _record_failed(self, event: CommitRecordFailed) -> Step:
        self.state = SourceState.ABORTING
        return _accept(Do.ROLL_BACK, Send(Abort(event.reason)))

    def _completed(self, event: Completed) -> Step:
        self.state = SourceState.DONE
        self.outcome = event.outcome
        return _accept(Deliver(event), RecordOutcome(event.outcome))

    def _redeliver_commit(self, event: Tick | LinkLost) -> Step:
        return _accept(Send(Commit()))

    def _pending(self, event: DecisionQuery) -> Step:
        return _ignore("the commit record is being written", Reply(DecisionAnswer("pending")))

    def _answer_commit(self, event: DecisionQuery) -> Step:
        return _ignore("committed", Reply(DecisionAnswer("commit", self.outcome)))

    def _answer_abort(self, event: DecisionQuery) -> Step:
        return _ignore("aborted", Reply(DecisionAnswer("abort", self.outcome)))

    def _answer_done(self, event: DecisionQuery) -> Step:
        decision: Literal["commit", "abort"] = "commit" if self.committed else "abort"
        return _ignore("ended", Reply(DecisionAnswer(decision, self.outcome)))

    def _completed_again(self, event: Completed) -> Step:
        if self.committed:
            return _ignore("a duplicate")
        return _refuse("the migration was aborted: nothing can complete")

    def _rolled_back_while_aborting(self, event: RolledBack) -> Step:
        self.destination_rolled_back = True
        return _accept(Deliver(event))

    def _finished(self, event: Finished) -> Step:
        self.state = SourceState.DONE
        self.outcome = event.outcome
        return _accept(RecordOutcome(event.outcome), Send(FinalOutcome(event.outcome)))

    def _late(self, event: Event) -> Step:
        return _ignore("late: the transfer is over")

    TABLE: ClassVar[Mapping[Any, Mapping[type, Callable[[Any, Any], Step]]]]


Handler = Callable[[Any, Any], Step]


def ignored(reason: str) -> Handler:
    """A handler that leaves the state as it is: a duplicate or a late event."""
    return lambda machine, event: _ignore(reason)


def refused(reason: str) -> Handler:
    """A handler for an event the protocol forbids in that state."""
    return lambda machine, event: _refuse(reason)


_NEVER_COMPLETED = "the destination cannot complete a migration the source did not commit"


def _source_table() -> dict[SourceState, dict[type, Handler]]:
    S, m = SourceState, SourceMachine
    late = ignored("late: the transfer is over")
    reports: dict[type, Handler] = {t: m._report for t in _REPORTS}
    late_reports: dict[type, Handler] = {t: late for t in _REPORTS}
    undecided: dict[type, Handler] = {
        LocalFailure: m._abort,
        LinkLost: m._abort,
        RolledBack: m._abort,
        DecisionQuery: m._query_before_decision,
        Completed: refused(_NEVER_COMPLETED),
        Tick: ignored("nothing to retry"),
    }
    duplicate_vote = ignored("a duplicate vote")
    # Every pair is listed (tests/test_protocol.py checks it): a step of the
    # coordinator's own out of its order is a bug of the daemon, refused; a
    # report before the destination was told to begin is the peer's.
    out_of_order = refused("not a step the coordinator takes in this state")
    own: dict[type, Handler] = {
        t: out_of_order
        for t in (PrepareAnswered, Deciding, CommitRecorded, CommitRecordFailed, Finished)
    }
    premature = refused("the destination reports before it was told to begin")
    no_vcpus_yet = refused("the destination's vCPUs run only after the commit")
    return {
        S.PREPARING: {
            **own,
            **undecided,
            **{t: premature for t in (*_REPORTS, VcpusReport, Vote, OverBudget)},
            PrepareAnswered: m._answered,
        },
        S.TRANSFER: {
            **own,
            **undecided,
            **reports,
            Vote: m._vote,
            VcpusReport: no_vcpus_yet,
            OverBudget: m._report,
        },
        S.VOTED: {
            **own,
            **undecided,
            **reports,
            OverBudget: ignored("late: the destination voted"),
            Deciding: m._deciding,
            Vote: duplicate_vote,
            VcpusReport: no_vcpus_yet,
        },
        S.COMMITTING: {
            **own,
            VcpusReport: no_vcpus_yet,
            **reports,
            CommitRecorded: m._recorded,
            CommitRecordFailed: m._record_failed,
            DecisionQuery: m._pending,
            LinkLost: ignored("the commit record decides"),
            Tick: ignored("the commit record decides"),
            Vote: duplicate_vote,
            OverBudget: late,
            LocalFailure: refused("the commit decision is being recorded: no rollback now"),
            RolledBack: refused("the destination rolled back after its vote, undecided"),
            Completed: refused(_NEVER_COMPLETED),
        },
        S.COMMITTED: {
            **own,
            **late_reports,
            ArcReport: m._report,
            VcpusReport: m._report,
            Completed: m._completed,
            Tick: m._redeliver_commit,
            LinkLost: m._redeliver_commit,
            DecisionQuery: m._answer_commit,
            Vote: duplicate_vote,
            OverBudget: late,
            LocalFailure: refused("no rollback after the commit"),
            RolledBack: refused("the destination rolled back a committed migration"),
        },
        S.ABORTING: {
            **own,
            VcpusReport: late,
            **late_reports,
            RolledBack: m._rolled_back_while_aborting,
            Finished: m._finished,
            DecisionQuery: m._answer_abort,
            LocalFailure: ignored("already aborting"),
            LinkLost: ignored("already aborting"),
            Tick: ignored("nothing to retry"),
            Vote: late,
            OverBudget: late,
            Completed: refused(_NEVER_COMPLETED),
        },
        S.DONE: {
            **own,
            **late_reports,
            DecisionQuery: m._answer_done,
            VcpusReport: late,
            Completed: m._completed_again,
            RolledBack: late,
            Vote: late,
            OverBudget: late,
            LinkLost: late,
            Tick: late,
            LocalFailure: late,
        },
    }


SourceMachine.TABLE = _source_table()


# --------------------------------------------------------------------------
# The destination (participant)


class DestinationState(enum.Enum):
    PREPARED = "prepared"
    TRANSFER = "transfer"
    VOTING = "voting"
    VOTED = "voted"
    IN_DOUBT = "in_doubt"
    COMMITTED = "committed"
    ABORTING = "aborting"
    ABORTED = "aborted"
    DONE = "done"


#: The phases before the vote: this side may still abort on its own.
_UNVOTED = (DestinationState.PREPARED, DestinationState.TRANSFER, DestinationState.VOTING)


@dataclass
class DestinationMachine(_Machine):
    """The destination daemon's side of one migration between two hosts."""

    state: DestinationState = DestinationState.PREPARED
    #: The commit is known here (received, or recorded before a restart).
    committed: bool = False
    outcome: Outcome | None = None
    #: An outcome the source sent while the reset was still running.
    pending_outcome: Outcome | None = None
    #: What the last ``Completed`` or ``RolledBack`` said, to repeat it to a source that asks.
    last_report: Message | None = None

    @classmethod
    def restarted(
        cls, *, voted: bool, committed: bool, outcome: Outcome | None, reset: bool = False
    ) -> tuple[DestinationMachine, Step]:
        """The machine of a daemon that restarted, from its journal, and what to do first.

        ``reset``: the journal says the devices were reset (and freed) already:
        they may belong to another migration now, and are not touched again.
        """
        if outcome is not None:
            return cls(DestinationState.DONE, committed=committed, outcome=outcome), _accept()
        if committed:
            return cls(DestinationState.COMMITTED, committed=True), _accept(Do.RUN_DEVICES)
        if reset:
            return cls(DestinationState.ABORTED), _accept(Do.QUERY)
        if voted:
            return cls(DestinationState.IN_DOUBT), _accept(Do.QUERY)
        # Not voted: the source cannot have committed; abort alone.
        return cls(DestinationState.ABORTING), _accept(Do.RESET_DEVICES)

    # -- handlers --

    def _begin(self, event: Begin) -> Step:
        self.state = DestinationState.TRANSFER
        return _accept(Do.BEGIN_TRANSFER)

    def _initial_sent(self, event: InitialSent | Budget) -> Step:
        return _accept(Deliver(event))

    def _all_ready(self, event: AllReady) -> Step:
        self.state = DestinationState.VOTING
        return _accept(Do.RECORD_VOTE)

    def _vote_recorded(self, event: VoteRecorded) -> Step:
        self.state = DestinationState.VOTED
        return _accept(Send(Vote()))

    def _abort(self, event: Event) -> Step:
        self.state = DestinationState.ABORTING
        if isinstance(event, FinalOutcome):
            self.pending_outcome = event.outcome
        if isinstance(event, DecisionAnswer) and event.outcome is not None:
            self.pending_outcome = event.outcome
        return _accept(Do.RESET_DEVICES)

    def _commit(self, event: Commit | DecisionAnswer) -> Step:
        self.state = DestinationState.COMMITTED
        self.committed = True
        return _accept(Do.RUN_DEVICES, Do.RECORD_COMMIT_HERE)

    def _in_doubt(self, event: LinkLost) -> Step:
        self.state = DestinationState.IN_DOUBT
        return _accept(Do.QUERY)

    def _query(self, event: Tick) -> Step:
        return _accept(Do.QUERY)

    def _answer_once_committed(self, event: DecisionAnswer) -> Step:
        if event.decision == "abort":
            return _refuse("abort for a migration this side committed")
        return _ignore("committed already")

    def _commit_when_done(self, event: Commit) -> Step:
        if self.committed:
            return _repeat("a duplicate commit")(self, event)
        return _refuse("commit for a migration this side rolled back")

    def _abort_when_done(self, event: Abort) -> Step:
        if not self.committed:
            return _repeat("a duplicate abort")(self, event)
        return _refuse("this side recorded the commit: it cannot be aborted")

    def _outcome_when_done(self, event: FinalOutcome) -> Step:
        if event.outcome == self.outcome:
            return _ignore("the outcome is known")
        return _refuse(f"this side ended {self.outcome}, not {event.outcome}")

    def _answer(self, event: DecisionAnswer) -> Step:
        if event.decision == "commit":
            return self._commit(event)
        if event.decision == "abort":
            return self._abort(event)
        return _ignore("the source has not decided yet")

    def _answer_before_vote(self, event: DecisionAnswer) -> Step:
        if event.decision == "commit":
            return _refuse("a commit for a migration this side never voted for")
        if event.decision == "abort":
            return self._abort(event)
        return _ignore("the source has not decided yet")

    def _outcome_before_decision(self, event: FinalOutcome) -> Step:
        if event.outcome == "succeeded":
            return _refuse("succeeded before any commit: this side holds no committed state")
        # An outcome other than succeeded means the source aborted.
        return self._abort(event)

    def _ran(self, event: DevicesRan) -> Step:
        self.state = DestinationState.DONE
        self.outcome = event.outcome
        report = Completed(event.outcome, event.errors, event.resume_s)
        self.last_report = report
        return _accept(RecordOutcome(event.outcome), Send(report), Do.RELEASE)

    def _reset(self, event: DevicesReset) -> Step:
        report = RolledBack(event.errors)
        self.last_report = report
        if self.pending_outcome is not None:
            self.state = DestinationState.DONE
            self.outcome = self.pending_outcome
            return _accept(Send(report), Do.RELEASE, RecordOutcome(self.outcome))
        self.state = DestinationState.ABORTED
        # The source tells the outcome; asking too, in case that is lost.
        return _accept(Send(report), Do.RELEASE, Do.QUERY)

    def _outcome_while_aborting(self, event: FinalOutcome) -> Step:
        if event.outcome == "succeeded":
            return _refuse("succeeded for a migration this side is rolling back")
        self.pending_outcome = event.outcome
        return _accept()

    def _answer_while_aborting(self, event: DecisionAnswer) -> Step:
        if event.decision == "commit":
            return _refuse("commit for a migration this side is rolling back")
        if event.outcome is not None and event.outcome != "succeeded":
            self.pending_outcome = event.outcome
        return _accept()

    def _final(self, event: FinalOutcome | DecisionAnswer) -> Step:
        outcome = event.outcome
        if isinstance(event, DecisionAnswer):
            if event.decision == "commit":
                return _refuse("commit for a migration this side rolled back")
            if outcome is None:
                return _ignore("the source has not journaled the outcome yet")
        if outcome == "succeeded":
            return _refuse("succeeded for a migration this side rolled back")
        assert outcome is not None
        self.state = DestinationState.DONE
        self.outcome = outcome
        return _accept(RecordOutcome(outcome))


def _repeat(why: str) -> Handler:
    """Ignore a duplicate, telling the source again how this side ended."""

    def handler(machine: DestinationMachine, event: Event) -> Step:
        report = machine.last_report
        if report is None and machine.state is DestinationState.DONE:
            # Restarted after it ended: the journal's outcome says it again.
            assert machine.outcome is not None
            report = Completed(machine.outcome) if machine.committed else RolledBack()
        again = () if report is None else (Send(report),)
        return _ignore(why, *again)

    return handler


def _destination_table() -> dict[DestinationState, dict[type, Handler]]:
    D, m = DestinationState, DestinationMachine
    late = ignored("late")
    unvoted: dict[type, Handler] = {
        Abort: m._abort,
        LinkLost: m._abort,
        FinalOutcome: m._outcome_before_decision,
        DecisionAnswer: m._answer_before_vote,
        Commit: refused("commit before this side voted"),
        Tick: ignored("nothing to retry"),
    }
    loading: dict[type, Handler] = {
        **unvoted,
        Begin: ignored("a duplicate begin"),
        InitialSent: m._initial_sent,
    }
    decided_abort = ignored("late: this side aborted")
    # Every pair is listed (tests/test_protocol.py checks it): a step of this
    # daemon's own out of its order is its bug, refused.
    out_of_order = refused("not a step this daemon takes in this state")
    own: dict[type, Handler] = {
        t: out_of_order
        for t in (AllReady, VoteRecorded, VoteRecordFailed, DevicesRan, DevicesReset)
    }
    return {
        D.PREPARED: {
            **own,
            **unvoted,
            Begin: m._begin,
            InitialSent: refused("pre-copy data announced before the transfer began"),
            Budget: refused("a budget share before the transfer began"),
        },
        D.TRANSFER: {**own, **loading, AllReady: m._all_ready, Budget: m._initial_sent},
        D.VOTING: {
            **own,
            **loading,
            Budget: ignored("late: this side is voting"),
            VoteRecorded: m._vote_recorded,
            VoteRecordFailed: m._abort,
        },
        D.VOTED: {
            **own,
            Commit: m._commit,
            Abort: m._abort,
            FinalOutcome: m._outcome_before_decision,
            DecisionAnswer: m._answer,
            LinkLost: m._in_doubt,
            Begin: late,
            InitialSent: m._initial_sent,
            Budget: late,
            Tick: ignored("nothing to retry"),
        },
        D.IN_DOUBT: {
            **own,
            Commit: m._commit,
            Abort: m._abort,
            FinalOutcome: m._outcome_before_decision,
            DecisionAnswer: m._answer,
            Tick: m._query,
            LinkLost: ignored("already in doubt"),
            Begin: late,
            InitialSent: late,
            Budget: late,
        },
        D.COMMITTED: {
            **own,
            DevicesRan: m._ran,
            Commit: ignored("a duplicate commit"),
            DecisionAnswer: m._answer_once_committed,
            Abort: refused("this side recorded the commit: it cannot be aborted"),
            FinalOutcome: refused("after the commit the destination says how it ended"),
            LinkLost: ignored("completing: the decision is known"),
            Tick: ignored("completing"),
            Begin: late,
            InitialSent: late,
            Budget: late,
            VoteRecorded: late,
        },
        D.ABORTING: {
            **own,
            DevicesReset: m._reset,
            Abort: ignored("already rolling back"),
            FinalOutcome: m._outcome_while_aborting,
            DecisionAnswer: m._answer_while_aborting,
            Commit: refused("commit for a migration this side rolls back"),
            LinkLost: ignored("already rolling back"),
            Tick: ignored("rolling back"),
            Begin: late,
            InitialSent: late,
            Budget: late,
            AllReady: decided_abort,
            VoteRecorded: decided_abort,
            VoteRecordFailed: decided_abort,
        },
        D.ABORTED: {
            **own,
            FinalOutcome: m._final,
            DecisionAnswer: m._final,
            Tick: m._query,
            Abort: _repeat("already rolled back"),
            Begin: _repeat("rolled back"),
            Commit: refused("commit for a migration this side rolled back"),
            LinkLost: ignored("rolled back: the outcome is asked for"),
            InitialSent: late,
            Budget: late,
            VoteRecorded: decided_abort,
        },
        D.DONE: {
            **own,
            Commit: m._commit_when_done,
            Abort: m._abort_when_done,
            FinalOutcome: m._outcome_when_done,
            DecisionAnswer: ignored("ended"),
            Tick: ignored("ended"),
            LinkLost: ignored("ended"),
            Begin: late,
            InitialSent: late,
            Budget: late,
            VoteRecorded: late,
        },
    }


DestinationMachine.TABLE = _destination_table()

#: Every event either machine can be fed, for tests that walk the whole table: its
#: own events and every message its peer (or either side) sends.
SOURCE_EVENTS: tuple[type, ...] = (
    PrepareAnswered,
    LocalFailure,
    Deciding,
    CommitRecorded,
    CommitRecordFailed,
    Finished,
    LinkLost,
    Tick,
    *(m for m in MESSAGES if m.FROM != "source"),
)
DESTINATION_EVENTS: tuple[type, ...] = (
    AllReady,
    VoteRecorded,
    VoteRecordFailed,
    DevicesRan,
    DevicesReset,
    LinkLost,
    Tick,
    *(m for m in MESSAGES if m.FROM != "destination"),
)
