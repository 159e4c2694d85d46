"""A model of two daemons running one migration, for exhaustive exploration.

The two protocol machines of ``orchestrator.peer.protocol`` are the real
ones; around them this module models what the daemons do with their actions
(journal writes, device work that takes time, messages on a network that
loses, duplicates and reorders them) and what can happen to them (a local
failure, the channel breaking, a crash and a restart from the journal).

A :class:`World` is immutable and hashable, so a search can keep every world
it reached; :func:`successors` lists every world one event away, and
:func:`settle` runs a world to its end the way a healthy network and two
healthy daemons would, so that a test can ask, of every world it reached,
whether the migration still ends well from there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from orchestrator.peer.protocol import (
    Abort,
    AllReady,
    CommitRecorded,
    CommitRecordFailed,
    Deciding,
    DecisionQuery,
    Deliver,
    DestinationMachine,
    DestinationState,
    DevicesRan,
    DevicesReset,
    Do,
    Event,
    Finished,
    LinkLost,
    LocalFailure,
    Message,
    PrepareAnswered,
    RecordOutcome,
    Reply,
    Send,
    SourceMachine,
    SourceState,
    Step,
    Tick,
    VoteRecorded,
    VoteRecordFailed,
)
from orchestrator.report import Outcome

#: Two more messages the model needs: the prepare call and its answer (REST).
PREPARE = "prepare"
PREPARED = "prepared"

Packet = tuple[str, object]  # ("s2d" | "d2s", Message or PREPARE/PREPARED)


class Budget(NamedTuple):
    """What may still go wrong, so that the search stays finite."""

    source_crashes: int = 1
    destination_crashes: int = 1
    duplicates: int = 1


class World(NamedTuple):
    # The machines, frozen into tuples of their fields; None: that daemon is down
    # (or, for the destination, was never prepared).
    source: tuple[object, ...] | None
    destination: tuple[object, ...] | None
    destination_prepared: bool = False
    # The journals.
    source_committed: bool = False
    source_outcome: str | None = None
    destination_voted: bool = False
    destination_committed: bool = False
    destination_reset: bool = False  # journaled once the reset is done, before the release
    destination_outcome: str | None = None
    # The devices.
    source_running: bool = True
    source_stopped: bool = False  # stop-copy ran: every stream ended
    source_began: bool = False  # pre-copy began (the outcome is no longer refused)
    destination_running: bool = False
    destination_locked: bool = False
    # Work in flight whose end is an event of its own: ("s" | "d", name).
    pending: frozenset[tuple[str, str]] = frozenset()
    # The channel as each live daemon sees it (a LinkLost each per incarnation).
    source_link: bool = True
    destination_link: bool = True
    network: tuple[Packet, ...] = ()
    budget: Budget = Budget()


def start() -> World:
    """The source journaled the migration and sent the prepare call."""
    return World(source=_freeze(SourceMachine()), destination=None, network=(("s2d", PREPARE),))


def _freeze(machine: SourceMachine | DestinationMachine) -> tuple[object, ...]:
    return tuple(vars(machine).values())


def _source(world: World) -> SourceMachine:
    assert world.source is not None
    return SourceMachine(*world.source)  # type: ignore[arg-type]


def _destination(world: World) -> DestinationMachine:
    assert world.destination is not None
    return DestinationMachine(*world.destination)  # type: ignore[arg-type]


def source_state(world: World) -> SourceState | None:
    return None if world.source is None else _source(world).state


def destination_state(world: World) -> DestinationState | None:
    return None if world.destination is None else _destination(world).state


# -- feeding events and carrying out actions --------------------------------


def _feed_source(world: World, event: Event) -> World:
    machine = _source(world)
    step = machine.handle(event)
    world = world._replace(source=_freeze(machine))
    return _source_actions(world, step, machine)


def _feed_destination(world: World, event: Event) -> World:
    machine = _destination(world)
    step = machine.handle(event)
    world = world._replace(destination=_freeze(machine))
    return _destination_actions(world, step, machine)


def _source_actions(world: World, step: Step, machine: SourceMachine) -> World:
    for action in step.actions:
        if isinstance(action, Send | Reply):
            world = _send(world, "s2d", action.message)
        elif isinstance(action, RecordOutcome):
            world = world._replace(source_outcome=action.outcome)
        elif action is Do.ROLL_BACK:
            world = _begin(world, "s", "roll_back")
        elif action is Do.RECORD_COMMIT:
            world = _begin(world, "s", "record_commit")
        elif action is Do.COMPLETE_SOURCE:
            world = world._replace(source_running=False)
        elif isinstance(action, Deliver):
            pass  # the coordinator's waiters: modelled by what enables its events
        else:  # pragma: no cover - a new action the model must learn
            raise AssertionError(f"the model does not know the source action {action!r}")
    return world


def _destination_actions(world: World, step: Step, machine: DestinationMachine) -> World:
    for action in step.actions:
        if isinstance(action, Send | Reply):
            world = _send(world, "d2s", action.message)
        elif isinstance(action, RecordOutcome):
            # The journal's finish row holds the commit too: a commit record still
            # on its way is written by then.
            committed = world.destination_committed or machine.committed
            world = world._replace(
                destination_outcome=action.outcome, destination_committed=committed
            )
        elif action is Do.BEGIN_TRANSFER:
            pass
        elif action is Do.RECORD_VOTE:
            world = _begin(world, "d", "record_vote")
        elif action is Do.RECORD_COMMIT_HERE:
            world = _begin(world, "d", "record_commit")
        elif action is Do.RUN_DEVICES:
            world = _begin(world, "d", "run")
        elif action is Do.RESET_DEVICES:
            world = _begin(world, "d", "reset")
        elif action is Do.RELEASE:
            world = world._replace(destination_locked=False)
        elif action is Do.QUERY:
            world = _send(world, "d2s", DecisionQuery())
        elif isinstance(action, Deliver):
            pass
        else:  # pragma: no cover
            raise AssertionError(f"the model does not know the destination action {action!r}")
    return world


def _send(world: World, direction: str, message: object) -> World:
    return world._replace(network=tuple(sorted((*world.network, (direction, message)), key=repr)))


def _begin(world: World, side: str, work: str) -> World:
    return world._replace(pending=world.pending | {(side, work)})


def _done(world: World, side: str, work: str) -> World:
    return world._replace(pending=world.pending - {(side, work)})


def _without(world: World, index: int) -> World:
    return world._replace(network=world.network[:index] + world.network[index + 1 :])


# -- what can happen next -----------------------------------------------------


def successors(world: World) -> Iterator[tuple[str, World]]:
    """Every world one event away, each with a note saying which event."""
    yield from _deliveries(world)
    yield from _work_ending(world)
    yield from _source_choices(world)
    yield from _destination_choices(world)
    yield from _mishaps(world)


def _deliveries(world: World) -> Iterator[tuple[str, World]]:
    seen = set()
    for i, packet in enumerate(world.network):
        if packet in seen:
            continue
        seen.add(packet)
        rest = _without(world, i)
        yield f"lost {_name(packet)}", rest
        if world.budget.duplicates > 0:
            budget = world.budget._replace(duplicates=world.budget.duplicates - 1)
            yield f"duplicated {_name(packet)}", _send(world, *packet)._replace(budget=budget)
        delivered = _deliver(rest, packet)
        if delivered is not None:
            yield f"delivered {_name(packet)}", delivered


def _name(packet: Packet) -> str:
    direction, message = packet
    label = message if isinstance(message, str) else type(message).__name__
    return f"{direction}:{label}"


def _deliver(world: World, packet: Packet) -> World | None:
    direction, message = packet
    if direction == "s2d":
        if message == PREPARE:
            if world.destination_prepared:
                return None  # the destination answers 409: modelled as the source's failure
            prepared = world._replace(
                destination=_freeze(DestinationMachine()),
                destination_prepared=True,
                destination_locked=True,
            )
            return _send(prepared, "d2s", PREPARED)
        if world.destination is None:
            return None
        assert isinstance(message, Message)
        return _feed_destination(world, message)
    if world.source is None:
        return None
    if message == PREPARED:
        return _feed_source(world, PrepareAnswered())
    assert isinstance(message, Message)
    return _feed_source(world, message)


def _work_ending(world: World) -> Iterator[tuple[str, World]]:
    for side, work in sorted(world.pending):
        rest = _done(world, side, work)
        if (side, work) == ("s", "roll_back"):
            outcome: Outcome = "rolled_back" if rest.source_began else "refused"
            back = rest._replace(source_running=True, source_stopped=False)
            yield "source rolled back", _feed_source(back, Finished(outcome))
        elif (side, work) == ("s", "record_commit"):
            recorded = rest._replace(source_committed=True)
            yield "commit recorded", _feed_source(recorded, CommitRecorded())
            yield "commit record failed", _feed_source(rest, CommitRecordFailed("disk"))
        elif (side, work) == ("d", "record_vote"):
            voted = rest._replace(destination_voted=True)
            yield "vote recorded", _feed_destination(voted, VoteRecorded())
            yield "vote record failed", _feed_destination(rest, VoteRecordFailed("disk"))
        elif (side, work) == ("d", "record_commit"):
            yield "destination recorded commit", rest._replace(destination_committed=True)
        elif (side, work) == ("d", "run"):
            ran = rest._replace(destination_running=True)
            yield "devices ran", _feed_destination(ran, DevicesRan("succeeded"))
        elif (side, work) == ("d", "reset"):
            reset = rest._replace(destination_running=False, destination_reset=True)
            yield "devices reset", _feed_destination(reset, DevicesReset())


_UNDECIDED = (SourceState.PREPARING, SourceState.TRANSFER, SourceState.VOTED)


def _source_choices(world: World) -> Iterator[tuple[str, World]]:
    if world.source is None:
        return
    state = _source(world).state
    if state is SourceState.TRANSFER and not world.source_stopped:
        began = world._replace(source_began=True)
        stopped = began._replace(source_running=False, source_stopped=True)
        yield "source stopped (stop-copy)", stopped
    if state is SourceState.VOTED and world.source_stopped:
        yield "source decides commit", _feed_source(world, Deciding())
    if state in _UNDECIDED:
        # A device failure, a cancel, or a deadline (a lost message stalls the other side).
        failed = _feed_source(world, LocalFailure("a device failed, or a deadline passed"))
        yield "source failure", failed
    if world.source_link:
        lost = _feed_source(world._replace(source_link=False), LinkLost("cut"))
        yield "source lost the channel", lost
    if state is SourceState.COMMITTED and not _in_flight(world, "s2d"):
        yield "source retries", _feed_source(world, Tick())


def _destination_choices(world: World) -> Iterator[tuple[str, World]]:
    if world.destination is None:
        return
    state = _destination(world).state
    if state is DestinationState.TRANSFER and world.source_stopped:
        yield "destination ready", _feed_destination(world, AllReady())
    if world.destination_link:
        lost = _feed_destination(world._replace(destination_link=False), LinkLost("cut"))
        yield "destination lost the channel", lost
    asking = (DestinationState.IN_DOUBT, DestinationState.ABORTED)
    if state in asking and not _in_flight(world, "d2s"):
        yield "destination asks again", _feed_destination(world, Tick())


def _in_flight(world: World, direction: str) -> bool:
    return any(d == direction for d, _ in world.network)


def _mishaps(world: World) -> Iterator[tuple[str, World]]:
    budget = world.budget
    if world.source is not None and budget.source_crashes > 0:
        yield (
            "source crashed",
            world._replace(
                source=None,
                pending=frozenset(p for p in world.pending if p[0] != "s"),
                network=tuple(p for p in world.network if p[0] != "d2s"),
                budget=budget._replace(source_crashes=budget.source_crashes - 1),
            ),
        )
    if world.source is None:
        yield "source restarted", restart_source(world)
    if world.destination is not None and budget.destination_crashes > 0:
        yield (
            "destination crashed",
            world._replace(
                destination=None,
                pending=frozenset(p for p in world.pending if p[0] != "d"),
                network=tuple(p for p in world.network if p[0] != "s2d"),
                budget=budget._replace(destination_crashes=budget.destination_crashes - 1),
            ),
        )
    if world.destination is None and world.destination_prepared:
        yield "destination restarted", restart_destination(world)


def restart_source(world: World) -> World:
    machine, step = SourceMachine.restarted(
        committed=world.source_committed,
        outcome=world.source_outcome,  # type: ignore[arg-type]
    )
    world = world._replace(source=_freeze(machine), source_link=False)
    return _source_actions(world, step, machine)


def restart_destination(world: World) -> World:
    machine, step = DestinationMachine.restarted(
        voted=world.destination_voted,
        committed=world.destination_committed,
        outcome=world.destination_outcome,  # type: ignore[arg-type]
        reset=world.destination_reset,
    )
    # A restarted daemon's recovery holds its devices until they are settled; reset
    # and freed ones it leaves alone (another migration may hold them now).
    settled = machine.state in (DestinationState.DONE, DestinationState.ABORTED)
    world = world._replace(
        destination=_freeze(machine), destination_link=False, destination_locked=not settled
    )
    return _destination_actions(world, step, machine)


# -- invariants ---------------------------------------------------------------


def violations(world: World) -> list[str]:
    """What is wrong in this world, whatever comes next."""
    out = []
    if world.source_running and world.destination_running:
        out.append("the VM runs on both hosts")
    if world.destination_running and not world.source_committed:
        out.append("the destination runs without the source's commit record")
    if world.destination_committed and not world.source_committed:
        out.append("the destination recorded a commit the source never recorded")
    both = world.source_outcome and world.destination_outcome
    if both and world.source_outcome != world.destination_outcome:
        out.append(
            f"the journals disagree: source {world.source_outcome}, "
            f"destination {world.destination_outcome}"
        )
    if world.source_outcome == "succeeded" and not world.destination_committed:
        out.append("the source journaled success the destination never committed")
    return out


_SETTLED: dict[World, tuple[World, tuple[str, ...]]] = {}


def settle(world: World, limit: int = 200) -> tuple[World, list[str]]:
    """Run ``world`` to its end as two healthy daemons on a healthy network would:
    crashed daemons restart, messages arrive in order, work in flight ends well,
    the coordinator goes forward, and the retry timers fire when nothing else can
    (failing that, the deadlines: a message lost on the way stalls whoever waits).

    Returns the end and what is wrong with it (empty: the migration ended well).
    The way from a world to its end is always the same, so every world on it
    keeps its answer for the next search that passes through it.
    """
    world = world._replace(budget=Budget(0, 0, 0))
    path = []
    answer: tuple[World, tuple[str, ...]] | None = None
    for _ in range(limit):
        answer = _SETTLED.get(world)
        if answer is not None:
            break
        path.append(world)
        nxt = _healthy_step(world)
        if nxt is None:
            answer = (world, tuple(_judge(world)))
            break
        world = nxt
    if answer is None:
        answer = (world, ("no end within the step limit",))
    for w in path:
        _SETTLED[w] = answer
    return answer[0], list(answer[1])


def _healthy_step(world: World) -> World | None:
    """The next world on the healthy way to the end; None where it ends."""
    if world.source is None:
        return restart_source(world)
    if world.destination is None and world.destination_prepared:
        return restart_destination(world)
    if world.network:
        packet, rest = world.network[0], world._replace(network=world.network[1:])
        return _deliver(rest, packet) or rest
    if world.pending:
        return next(w for note, w in _work_ending(world) if "failed" not in note)
    choices = dict(_source_choices(world))
    choices.update(_destination_choices(world))
    for note in ("source stopped (stop-copy)", "source decides commit", "destination ready"):
        if note in choices:
            return choices[note]
    if _finished(world):
        return None
    # Nothing moves: the retry timers fire, and failing that the deadlines
    # (a message lost on the way stalls whoever waits for it).
    for note in (
        "source retries",
        "destination asks again",
        "source failure",
        "destination lost the channel",
    ):
        if note in choices:
            return choices[note]
    return None


def _judge(world: World) -> list[str]:
    problems = violations(world)
    if not _finished(world):
        problems.append(
            f"stuck: source {source_state(world)}, destination {destination_state(world)}"
        )
        return problems
    if world.source_outcome != world.destination_outcome and world.destination_prepared:
        problems.append("the journals end with different outcomes")
    if world.source_running == world.destination_running:
        where = "both hosts" if world.source_running else "neither host"
        problems.append(f"the VM ends running on {where}")
    if world.destination_locked:
        problems.append("the destination's devices stay locked")
    return problems


def _finished(world: World) -> bool:
    if world.source is None or _source(world).state is not SourceState.DONE:
        return False
    if not world.destination_prepared:
        return True
    return world.destination is not None and _destination(world).state is DestinationState.DONE


__all__ = [
    "Abort",
    "Budget",
    "World",
    "settle",
    "start",
    "successors",
    "violations",
]
