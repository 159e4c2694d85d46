"""The commit protocol's two machines and its messages, step by step.

Plain synchronous tests in the style of h11's: the whole state is checked
after every step, and a step the protocol forbids leaves it unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import pytest

from orchestrator.errors import ProtocolViolation
from orchestrator.peer.messages import MalformedMessage, decode, encode, negotiate_version
from orchestrator.peer.protocol import (
    DESTINATION_EVENTS,
    SOURCE_EVENTS,
    Abort,
    AllReady,
    ArcReport,
    Begin,
    Budget,
    Commit,
    CommitRecorded,
    CommitRecordFailed,
    Completed,
    Deciding,
    DecisionAnswer,
    DecisionQuery,
    Deliver,
    DestinationMachine,
    DestinationState,
    DevicesRan,
    DevicesReset,
    Do,
    Event,
    FinalOutcome,
    Finished,
    InitialSent,
    LinkLost,
    Loaded,
    LoadFailed,
    LocalFailure,
    OverBudget,
    PrepareAnswered,
    RecordOutcome,
    Refused,
    Reply,
    RolledBack,
    Send,
    SourceMachine,
    SourceState,
    Tick,
    VcpusReport,
    Vote,
    VoteRecorded,
    VoteRecordFailed,
)
from orchestrator.report import ErrorInfo, Outcome
from orchestrator.states import DeviceState

ERROR = ErrorInfo(kind="device_error", message="EIO", device="gpu0", operation="write")

#: One instance of every event either machine can be fed.
SAMPLES: dict[type, Any] = {
    PrepareAnswered: PrepareAnswered(),
    LocalFailure: LocalFailure("a device failed"),
    Deciding: Deciding(),
    CommitRecorded: CommitRecorded(),
    CommitRecordFailed: CommitRecordFailed("disk full"),
    Finished: Finished("rolled_back"),
    LinkLost: LinkLost("cut"),
    Tick: Tick(),
    ArcReport: ArcReport(
        "gpu0", DeviceState.RESUMING, DeviceState.STOP, True, DeviceState.STOP, 0.001
    ),
    Loaded: Loaded("gpu0", 4096, 0.0001),
    LoadFailed: LoadFailed("gpu0", DeviceState.ERROR, ERROR),
    Vote: Vote(),
    VcpusReport: VcpusReport("resume", True, "running", 0.002),
    Completed: Completed("succeeded"),
    RolledBack: RolledBack((ERROR,)),
    DecisionQuery: DecisionQuery(),
    Refused: Refused("commit", "commit before this side voted"),
    AllReady: AllReady(),
    VoteRecorded: VoteRecorded(),
    VoteRecordFailed: VoteRecordFailed("disk full"),
    DevicesRan: DevicesRan("succeeded"),
    DevicesReset: DevicesReset(),
    Begin: Begin(),
    InitialSent: InitialSent("gpu0", 1 << 20),
    Budget: Budget(0.05, 0.01),
    OverBudget: OverBudget("settle_arcs", 0.045, 0.01, 0.05, "gpu0"),
    Commit: Commit(),
    Abort: Abort("a device failed"),
    FinalOutcome: FinalOutcome("rolled_back"),
    DecisionAnswer: DecisionAnswer("abort", "rolled_back"),
}


# -- every pair has one defined answer -----------------------------------------


def check_defined(machine: SourceMachine | DestinationMachine, event: Any) -> None:
    """The pair is decided in the machine's table (not by a fallback), the event
    gets a result, and only an accepted one changes the state."""
    if not isinstance(event, Refused):  # never answered, whatever the state
        assert type(event) in machine.TABLE[machine.state], "a pair the table leaves out"
    before = copy.deepcopy(machine)
    step = machine.handle(event)
    assert step.verdict in ("accepted", "ignored", "refused")
    if step.verdict != "accepted":
        assert machine == before, "only an accepted event changes the state"
        assert step.reason
    if step.verdict == "refused":
        assert step.actions == ()


@pytest.mark.parametrize("state", list(SourceState))
@pytest.mark.parametrize("event_type", SOURCE_EVENTS)
def test_every_source_state_and_event_has_a_defined_result(
    state: SourceState, event_type: type
) -> None:
    check_defined(SourceMachine(state), SAMPLES[event_type])


@pytest.mark.parametrize("state", list(DestinationState))
@pytest.mark.parametrize("event_type", DESTINATION_EVENTS)
def test_every_destination_state_and_event_has_a_defined_result(
    state: DestinationState, event_type: type
) -> None:
    outcome: Outcome | None = "succeeded" if state is DestinationState.DONE else None
    check_defined(DestinationMachine(state, outcome=outcome), SAMPLES[event_type])


def test_a_refusal_from_the_peer_is_never_answered() -> None:
    # Two daemons refusing each other's refusals would talk forever.
    for machine in (SourceMachine(), DestinationMachine()):
        step = machine.handle(Refused("vote", "why"))
        assert step.verdict == "ignored" and step.actions == ()


# -- the strict budget's share (protocol version 2) ------------------------------


def test_the_budget_share_reaches_a_loading_destination_only() -> None:
    share = Budget(0.05, 0.01)
    loading = DestinationMachine(DestinationState.TRANSFER)
    assert loading.handle(share).actions == (Deliver(share),)
    assert DestinationMachine().handle(share).verdict == "refused"  # before the transfer
    # Once this side votes, its steps before the vote are over: the share is late.
    for state in (DestinationState.VOTING, DestinationState.VOTED, DestinationState.ABORTING):
        step = DestinationMachine(state).handle(share)
        assert step.verdict == "ignored" and step.actions == ()


def test_a_destination_over_its_share_is_heard_before_its_vote_only() -> None:
    over = OverBudget("settle_arcs", 0.045, 0.01, 0.05, "gpu0")
    source = SourceMachine(SourceState.TRANSFER)
    assert source.handle(over).actions == (Deliver(over),)
    assert source.state is SourceState.TRANSFER  # the coordinator decides the abort
    voted = SourceMachine(SourceState.VOTED)
    assert voted.handle(over).verdict == "ignored"
    assert SourceMachine().handle(over).verdict == "refused"


def test_the_share_travels_as_durations() -> None:
    for message in (Budget(0.05, 0.01), OverBudget("vote", 0.06, 0.0, 0.05)):
        assert decode(encode(message)) == message
    with pytest.raises(MalformedMessage, match="left_s"):
        decode({"op": "budget", "left_s": "soon", "settle_s": 0.01})


# -- the destination ------------------------------------------------------------


def ready_destination() -> DestinationMachine:
    machine = DestinationMachine()
    assert machine.handle(Begin()).actions == (Do.BEGIN_TRANSFER,)
    assert machine.handle(AllReady()).actions == (Do.RECORD_VOTE,)
    assert machine.handle(VoteRecorded()).actions == (Send(Vote()),)
    assert machine.state is DestinationState.VOTED
    return machine


def test_the_destination_walks_to_its_vote_then_commits() -> None:
    machine = ready_destination()
    step = machine.handle(Commit())
    assert step.actions == (Do.RUN_DEVICES, Do.RECORD_COMMIT_HERE)
    assert machine.state is DestinationState.COMMITTED and machine.committed
    step = machine.handle(DevicesRan("succeeded", resume_s=0.002))
    assert step.actions == (
        RecordOutcome("succeeded"),
        Send(Completed("succeeded", (), 0.002)),
        Do.RELEASE,
    )
    assert machine.state.value == "done" and machine.outcome == "succeeded"


def test_commit_before_the_vote_is_refused_and_changes_nothing() -> None:
    unvoted: list[list[Event]] = [[], [Begin()], [Begin(), AllReady()]]
    for events in unvoted:
        machine = DestinationMachine()
        for event in events:
            machine.handle(event)
        before = copy.deepcopy(machine)
        step = machine.handle(Commit())
        assert step.verdict == "refused"
        assert "voted" in step.reason
        assert machine == before


def test_an_outcome_of_success_before_any_commit_is_refused() -> None:
    # The old daemon took "finish: succeeded" before any data and reported success.
    machine = DestinationMachine()
    machine.handle(Begin())
    step = machine.handle(FinalOutcome("succeeded"))
    assert step.verdict == "refused"
    assert machine.state is DestinationState.TRANSFER and machine.outcome is None


def test_an_outcome_of_rollback_before_the_abort_arrives_means_the_abort() -> None:
    machine = DestinationMachine()
    machine.handle(Begin())
    assert machine.handle(FinalOutcome("rolled_back")).actions == (Do.RESET_DEVICES,)
    step = machine.handle(DevicesReset())
    assert step.actions == (Send(RolledBack()), Do.RELEASE, RecordOutcome("rolled_back"))
    assert machine.state is DestinationState.DONE


def test_a_vote_then_the_channel_lost_leaves_the_destination_in_doubt_asking() -> None:
    machine = ready_destination()
    assert machine.handle(LinkLost("cut")).actions == (Do.QUERY,)
    assert machine.state is DestinationState.IN_DOUBT
    assert machine.handle(Tick()).actions == (Do.QUERY,)
    pending = machine.handle(DecisionAnswer("pending"))
    assert pending.verdict == "ignored"
    assert machine.state.value == "in_doubt"
    assert machine.handle(DecisionAnswer("commit")).actions == (
        Do.RUN_DEVICES,
        Do.RECORD_COMMIT_HERE,
    )
    assert machine.state.value == "committed"


def test_in_doubt_an_abort_answer_resets_and_then_asks_for_the_outcome() -> None:
    machine = ready_destination()
    machine.handle(LinkLost("cut"))
    assert machine.handle(DecisionAnswer("abort")).actions == (Do.RESET_DEVICES,)
    assert machine.handle(DevicesReset()).actions == (Send(RolledBack()), Do.RELEASE, Do.QUERY)
    assert machine.state.value == "aborted"
    assert machine.handle(Tick()).actions == (Do.QUERY,)
    assert machine.handle(DecisionAnswer("abort")).verdict == "ignored"  # outcome not yet known
    assert machine.handle(DecisionAnswer("abort", "rolled_back")).actions == (
        RecordOutcome("rolled_back"),
    )
    assert machine.state is DestinationState.DONE and machine.outcome == "rolled_back"


def test_before_its_vote_the_destination_aborts_alone_when_the_channel_goes() -> None:
    unvoted: list[list[Event]] = [[], [Begin()], [Begin(), AllReady()]]
    for events in unvoted:
        machine = DestinationMachine()
        for event in events:
            machine.handle(event)
        assert machine.handle(LinkLost("cut")).actions == (Do.RESET_DEVICES,)
        assert machine.state is DestinationState.ABORTING


def test_a_decision_delivered_twice_is_acted_on_once() -> None:
    machine = ready_destination()
    machine.handle(Commit())
    again = machine.handle(Commit())
    assert again.verdict == "ignored" and again.actions == ()
    machine.handle(DevicesRan("succeeded"))
    # Once ended, a repeated commit gets the answer again (it may have been lost).
    third = machine.handle(Commit())
    assert third.verdict == "ignored"
    assert third.actions == (Send(Completed("succeeded")),)

    machine = ready_destination()
    machine.handle(Abort("x"))
    assert machine.handle(Abort("x")).verdict == "ignored"
    machine.handle(DevicesReset())
    assert machine.handle(Abort("x")).actions == (Send(RolledBack()),)


def test_an_abort_after_the_commit_is_refused_and_a_commit_after_an_abort_too() -> None:
    machine = ready_destination()
    machine.handle(Commit())
    assert machine.handle(Abort("late")).verdict == "refused"
    assert machine.handle(DecisionAnswer("abort")).verdict == "refused"
    assert machine.state is DestinationState.COMMITTED

    machine = ready_destination()
    machine.handle(Abort("x"))
    assert machine.handle(Commit()).verdict == "refused"
    assert machine.state is DestinationState.ABORTING


@pytest.mark.parametrize(
    ("voted", "committed", "outcome", "state", "actions"),
    [
        (False, False, None, DestinationState.ABORTING, (Do.RESET_DEVICES,)),
        (True, False, None, DestinationState.IN_DOUBT, (Do.QUERY,)),
        (True, True, None, DestinationState.COMMITTED, (Do.RUN_DEVICES,)),
        (True, True, "succeeded", DestinationState.DONE, ()),
        (False, False, "rolled_back", DestinationState.DONE, ()),
    ],
)
def test_a_destination_restarts_from_each_durable_state(
    voted: bool, committed: bool, outcome: Any, state: DestinationState, actions: tuple[Any, ...]
) -> None:
    machine, step = DestinationMachine.restarted(voted=voted, committed=committed, outcome=outcome)
    assert machine.state is state
    assert step.actions == actions


def test_a_destination_restarted_after_its_end_answers_a_repeated_commit() -> None:
    # The exploration found this one: the Completed lost, the destination restarted.
    machine, _ = DestinationMachine.restarted(voted=True, committed=True, outcome="succeeded")
    assert machine.handle(Commit()).actions == (Send(Completed("succeeded")),)


# -- the source -------------------------------------------------------------------


def voted_source() -> SourceMachine:
    machine = SourceMachine()
    assert machine.handle(PrepareAnswered()).actions == (Send(Begin()),)
    arc = SAMPLES[ArcReport]
    assert machine.handle(arc).actions == (Deliver(arc),)
    assert machine.handle(Vote()).actions == (Deliver(Vote()),)
    assert machine.state is SourceState.VOTED
    return machine


def test_the_source_commits_after_the_vote_and_adopts_the_destinations_outcome() -> None:
    machine = voted_source()
    assert machine.handle(Deciding()).actions == (Do.RECORD_COMMIT,)
    assert machine.handle(DecisionQuery()).actions == (Reply(DecisionAnswer("pending")),)
    assert machine.handle(CommitRecorded()).actions == (Send(Commit()),)
    assert machine.committed
    done = Completed("failed", (ERROR,))
    assert machine.handle(done).actions == (Deliver(done), RecordOutcome("failed"))
    assert machine.state is SourceState.DONE and machine.outcome == "failed"
    assert machine.handle(DecisionQuery()).actions == (Reply(DecisionAnswer("commit", "failed")),)


def test_a_source_that_lost_the_destination_after_its_commit_delivers_it_again() -> None:
    machine = voted_source()
    machine.handle(Deciding())
    machine.handle(CommitRecorded())
    assert machine.handle(LinkLost("cut")).actions == (Send(Commit()),)
    assert machine.handle(Tick()).actions == (Send(Commit()),)
    assert machine.handle(LocalFailure("cancel")).verdict == "refused"
    assert machine.state is SourceState.COMMITTED


def test_asked_before_it_decided_the_source_decides_abort() -> None:
    machine = voted_source()
    step = machine.handle(DecisionQuery())
    assert Reply(DecisionAnswer("abort")) in step.actions
    assert Do.ROLL_BACK in step.actions
    assert machine.state is SourceState.ABORTING
    # ... and from then on it cannot commit.
    assert machine.handle(Deciding()).verdict == "refused"


def test_a_commit_record_that_fails_aborts() -> None:
    machine = voted_source()
    machine.handle(Deciding())
    step = machine.handle(CommitRecordFailed("disk full"))
    assert step.actions == (Do.ROLL_BACK, Send(Abort("disk full")))
    machine.handle(RolledBack())
    assert machine.destination_rolled_back
    assert machine.handle(Finished("rolled_back")).actions == (
        RecordOutcome("rolled_back"),
        Send(FinalOutcome("rolled_back")),
    )


def test_completed_before_the_commit_is_refused() -> None:
    for state in (SourceState.PREPARING, SourceState.TRANSFER, SourceState.VOTED):
        machine = SourceMachine(state)
        assert machine.handle(Completed("succeeded")).verdict == "refused"
        assert machine.state is state


@pytest.mark.parametrize(
    ("committed", "outcome", "state", "actions"),
    [
        (False, None, SourceState.ABORTING, (Do.ROLL_BACK, Send(Abort("the source restarted")))),
        (True, None, SourceState.COMMITTED, (Do.COMPLETE_SOURCE, Send(Commit()))),
        (True, "succeeded", SourceState.DONE, ()),
        (False, "refused", SourceState.DONE, ()),
    ],
)
def test_a_source_restarts_from_each_durable_state(
    committed: bool, outcome: Any, state: SourceState, actions: tuple[Any, ...]
) -> None:
    machine, step = SourceMachine.restarted(committed=committed, outcome=outcome)
    assert machine.state is state
    assert step.actions == actions
    if outcome is not None:
        decision: Literal["commit", "abort"] = "commit" if committed else "abort"
        assert machine.handle(DecisionQuery()).actions == (
            Reply(DecisionAnswer(decision, outcome)),
        )


# -- messages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [m for m in SAMPLES.values() if hasattr(m, "OP")],
    ids=lambda m: type(m).__name__,
)
def test_every_message_survives_its_codec(message: Any) -> None:
    assert decode(encode(message)) == message


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"op": "launch"}, "unknown message op 'launch'"),
        ({}, "unknown message op None"),
        ({"op": "initial_sent", "device": "gpu0"}, "field 'nbytes' is missing"),
        ({"op": "initial_sent", "device": "gpu0", "nbytes": "9"}, "field 'nbytes'"),
        ({"op": "initial_sent", "device": "gpu0", "nbytes": True}, "field 'nbytes'"),
        ({"op": "commit", "now": True}, "unknown field(s) now"),
        ({"op": "decision", "decision": "maybe"}, "field 'decision'"),
        ({"op": "completed", "outcome": "great"}, "field 'outcome'"),
        (
            {
                "op": "arc",
                "device": "g",
                "from_state": "FLYING",
                "to_state": "STOP",
                "ok": True,
                "state": "STOP",
            },
            "field 'from_state'",
        ),
        ({"op": "rolled_back", "errors": "EIO"}, "field 'errors'"),
    ],
)
def test_a_malformed_message_is_refused_naming_the_field(data: Any, says: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        decode(data)
    assert says in str(caught.value)


def test_versions_pick_the_newest_both_speak_or_refuse_naming_both() -> None:
    assert negotiate_version((1, 3), (1, 2)) == 2
    assert negotiate_version((1, 1), (1, 2)) == 1
    with pytest.raises(ProtocolViolation, match="the source speaks 3 to 4, this daemon 1 to 2"):
        negotiate_version((3, 4), (1, 2))
    with pytest.raises(ProtocolViolation, match="offers no protocol version"):
        negotiate_version(None, (1,))
