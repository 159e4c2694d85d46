"""bench/stream_throughput.py runs: a smoke run in quick mode (nothing timed is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> str:
    # As a user runs it: the destination process is spawned from the script.
    return subprocess.run(
        [sys.executable, "bench/stream_throughput.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout


def test_stream_throughput_quick_run_prints_its_table() -> None:
    out = run_bench("--quick")
    assert out.startswith("command: python bench/stream_throughput.py --quick\n")
    row = r"^\| 1 \| (\d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (met|missed) \|$"
    rows = re.findall(row, out, re.M)
    assert [r[0] for r in rows] == ["1", "4"]
    for _, plain, channel, ratio, verdict in rows:
        assert float(plain) > 0 and float(channel) > 0
        # Each figure is rounded to 0.01 on its own: allow for that.
        rounding = 0.005 * float(ratio) * (1 / float(plain) + 1 / float(channel)) + 0.005
        assert abs(float(ratio) - float(channel) / float(plain)) <= rounding
        if float(ratio) != 0.80:
            assert verdict == ("met" if float(ratio) > 0.80 else "missed")


def test_the_ceiling_table_shows_every_copy_beside_the_plain_one() -> None:
    out = run_bench("--quick", "--ceiling")
    header = (
        "| state MiB | connections | plain GB/s | plain + read GB/s | ratio "
        "| framed GB/s | ratio | framed + trio GB/s | ratio "
        "| channel via trio GB/s | ratio | channel GB/s | ratio |"
    )
    assert header in out.splitlines()
    number = r"([\d.]+)"
    row = rf"^\| 1 \| (\d) \| {number}" + rf" \| {number} \| {number}" * 5 + r" \|$"
    rows = re.findall(row, out, re.M)
    assert [r[0] for r in rows] == ["1", "4"]
    for _, plain, *pairs in rows:
        for rate, ratio in zip(pairs[::2], pairs[1::2], strict=True):
            assert float(rate) > 0
            # Each figure is printed to two decimals: the ratio agrees with the rates
            # within what that rounding allows (slow rates, on a busy machine, allow much).
            low = (float(rate) - 0.005) / (float(plain) + 0.005)
            high = (float(rate) + 0.005) / max(float(plain) - 0.005, 1e-9)
            assert low - 0.005 <= float(ratio) <= high + 0.005, (rate, plain, ratio)
