"""A process that writes to a journal until it is killed: the durability tests' victim.

python -m tests.journal_child commit STATE_DIR   create, commit, print "committed", wait
python -m tests.journal_child write STATE_DIR    create, then append batches of events
                                                 forever, printing each batch's last seq
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from orchestrator.engine import TraceEvent
from orchestrator.journal import Journal
from tests.helpers import make_plan, sim_device

MIGRATION = "m-child"


def _event(seq: int) -> TraceEvent:
    # A fat detail, so that a batch takes long enough to be caught mid-write.
    return TraceEvent(seq, float(seq), "decision", None, None, None, None, {"pad": "x" * 2000})


async def main(mode: str, state_dir: Path) -> None:
    journal = await Journal.open(state_dir)
    await journal.create(MIGRATION, make_plan([sim_device("gpu0"), sim_device("gpu1")]))
    if mode == "commit":
        await journal.record_commit(MIGRATION)
        print("committed", flush=True)
        await trio.sleep_forever()
    n = 0
    while True:
        last = await journal.record_events(MIGRATION, [_event(n + i) for i in range(200)])
        n += 200
        print(last, flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], Path(sys.argv[2]))
