"""bench/downtime_promise.py: its matrix, its verdicts, and its smallest run.

Nothing here asserts a timing: the machine that runs the suite is loaded.
The matrix and the summaries are checked on their own (the same seed, the
same matrix; a ratio out of its bounds is a miss, and its trials are listed),
and a tiny run of the benchmark, both placements and the shipped plans,
must print every table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.plan import Plan
from tests.helpers import load_bench

ROOT = Path(__file__).resolve().parent.parent


bench = load_bench("downtime_promise")


def test_the_same_seed_draws_the_same_matrix_and_it_spans_its_ranges() -> None:
    matrix = bench.draw_matrix(7, 200)
    assert matrix == bench.draw_matrix(7, 200)
    assert matrix != bench.draw_matrix(8, 200)
    assert {c.devices for c in matrix} >= {1, 64}
    assert min(c.transition_ms for c in matrix) < 0.2
    assert max(c.transition_ms for c in matrix) > 50
    assert all(0 <= c.dirty_fraction <= 0.9 for c in matrix)
    assert {c.pre_copy for c in matrix} == {True, False}
    assert {c.bottleneck for c in matrix} == {"plan", "device"}
    # Every plan of the matrix is one the orchestrator accepts.
    policies, _ = bench.policies()
    for config in matrix[:20]:
        for policy in policies:
            Plan.model_validate(bench.plan_for(config, policy, "t"))


def test_strict_runs_where_the_plan_has_a_downtime_policy_and_is_named_where_not() -> None:
    policies, note = bench.policies()
    labels = {p.label for p in policies}
    assert {"abort/best_effort", "switchover/best_effort"} <= labels
    if "downtime_policy" in Plan.model_fields:
        assert "abort/strict" in labels and note is None
    else:
        assert not any("strict" in label for label in labels)
        assert note is not None and "downtime_policy" in note


def _trial(config: Any, policy: Any, downtime: float, predicted: float, **kw: Any) -> Any:
    report = {
        "outcome": kw.get("outcome", "succeeded"),
        "downtime_ms": downtime,
        "phases": {"stop_copy": downtime / 2, "destination_grace": downtime / 2},
        "devices": [{"bytes_stopcopy": 100}],
        "precopy": {
            "expected_downtime_ms": predicted,
            "decision": kw.get("decision", "switchover"),
            "converged": kw.get("converged", True),
            "rounds": 1,
            "forecast": {
                "components": {"transfer": {"ms": predicted / 2, "source": "measured"}},
                "devices": {"d0": {"stop_bytes": 100}},
            },
        },
    }
    return bench.Trial.of(config, kw.get("placement", "one host"), policy, report)


def test_a_ratio_out_of_its_bounds_is_missed_and_its_worst_trials_are_listed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = bench.draw_matrix(1, 1)[0]
    abort = bench.Policy("abort", "best_effort")
    limit = config.limit_ms
    trials = [_trial(config, abort, limit * 0.5, limit * 0.5) for _ in range(20)]
    trials += [_trial(config, abort, limit * 0.9, limit * 0.5) for _ in range(5)]
    trials.append(_trial(config, abort, limit * 1.5, limit * 0.9))  # converged, over
    trials.append(_trial(config, abort, limit * 2, limit * 2, outcome="rolled_back",
                         decision="abort", converged=False))  # fmt: skip
    (row,) = bench.summarize(trials, [abort])
    verdicts = {t.what: t.met for t in row.targets}
    assert verdicts == {
        "p90 measured/predicted": False,
        "p99 measured/predicted": False,
        "converged: share over the limit": False,
    }
    assert [t.category for t in trials].count("aborted") == 1
    assert [t.category for t in trials].count("over5") == 1
    bench.print_misses([row], worst=2)
    out = capsys.readouterr().out
    assert "p90 measured/predicted" in out and "ratio 1.800" in out
    assert "phases (ms) vs forecast" in out


@pytest.mark.slow
def test_a_tiny_run_prints_every_table() -> None:
    done = subprocess.run(
        [sys.executable, "bench/downtime_promise.py", "--quick", "--trials", "1",
         "--plan-runs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("command: ")
    for heading in (
        "## Measured / predicted downtime",
        "## Outcomes and the limit",
        "## Strict: the worst pause against the limit",
        "## Missed targets",
        "## Shipped example plans",
        "the matrix: ",
    ):
        assert heading in out, out
    for placement in ("| one host |", "| two daemons |"):
        assert placement in out
    assert "sixty-four-devices.toml | 1 |" in out
