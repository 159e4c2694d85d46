"""Every interleaving of the two protocol machines, up to a bound, checked.

Messages are lost, duplicated and delivered in any order; either daemon may
fail locally, lose the channel, crash and restart from its journal, at any
point.  In every world reached the invariants hold (never both hosts
running the VM, no commit on the destination the source did not record,
journals that agree), and from every world reached, two healthy daemons on a
healthy network end the migration with one outcome in both journals, the VM
running on exactly one host and no device locked.
"""

from __future__ import annotations

from collections import deque

import pytest

from tests.protocol_model import Budget, World, settle, start, successors, violations

# About a minute each: the suite's slowest tests.
pytestmark = pytest.mark.slow


def explore(first: World, max_depth: int) -> tuple[int, dict[str, int], list[str]]:
    """Breadth first from ``first``: the worlds seen, how often each outcome ended a
    settled world, and the problems found (each with the path that led to it)."""
    seen = {first}
    parents: dict[World, tuple[World | None, str]] = {first: (None, "start")}
    queue = deque([(first, 0)])
    outcomes: dict[str, int] = {}
    problems: list[str] = []

    def path(world: World) -> str:
        steps = []
        node: World | None = world
        while node is not None:
            parent, note = parents[node]
            steps.append(note)
            node = parent
        return " -> ".join(reversed(steps))

    while queue and len(problems) < 5:
        world, depth = queue.popleft()
        wrong = violations(world)
        end, unsettled = settle(world)
        if wrong or unsettled:
            problems.append(f"{'; '.join(wrong + unsettled)}\n  after {path(world)}")
            continue
        key = str(end.source_outcome)
        outcomes[key] = outcomes.get(key, 0) + 1
        if depth == max_depth:
            continue
        for note, nxt in successors(world):
            if nxt not in seen:
                seen.add(nxt)
                parents[nxt] = (world, note)
                queue.append((nxt, depth + 1))
    return len(seen), outcomes, problems


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}")


def test_every_interleaving_up_to_the_bound_keeps_the_invariants(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Depth 16 holds the whole successful path (13 events) with a crash and a
    # restart of either side, or a lost or duplicated message, anywhere on it.
    worlds, outcomes, problems = explore(start(), max_depth=16)
    report(capsys, f"protocol exploration: {worlds} worlds to depth 16; endings {outcomes}")
    assert not problems, "\n".join(problems)
    # The exploration reached every way a migration can end.
    assert set(outcomes) >= {"succeeded", "rolled_back", "refused"}, outcomes


def test_with_two_crashes_of_each_side_nothing_is_lost_either(
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = start()._replace(budget=Budget(2, 2, 0))
    worlds, _, problems = explore(first, max_depth=13)
    report(capsys, f"protocol exploration, two crashes a side: {worlds} worlds to depth 13")
    assert not problems, "\n".join(problems)
