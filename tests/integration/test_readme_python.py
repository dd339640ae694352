"""The README's "From Python" example runs as printed and prints a figure for every policy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
#: A line of the example's output: label, load, p90 TTFT and SLO attainment.
LINE = re.compile(
    r"^(?P<label>\S+)\s+x(?P<load>[\d.]+)\s+p90 TTFT\s+(?P<ttft>\d+) ms, "
    r"SLO attainment\s+(?P<slo>[\d.]+)% over 2 seeds$"
)


def example() -> str:
    """The first Python block of the README's "From Python" section."""
    section = README.read_text().split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "README: no python block under ## From Python"
    return found.group(1)


def test_the_readme_python_example_prints_seed_averaged_figures_for_each_policy(tmp_path):
    root = str(README.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    # Run where a reader would, outside the repository, so nothing is written into it.
    done = subprocess.run(
        [sys.executable, "-c", example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = [LINE.match(line) for line in done.stdout.splitlines()]
    assert all(rows), done.stdout
    seen = {(m["label"], float(m["load"])) for m in rows}
    assert seen == {(p, x) for p in ("fcfs", "least_load", "laps") for x in (1.0, 1.5)}
    for m in rows:
        assert 0 < int(m["ttft"]) < 60_000 and 0 <= float(m["slo"]) <= 100
    # More load never helps: each policy's p90 TTFT rises from x1 to x1.5.
    ttft = {(m["label"], float(m["load"])): int(m["ttft"]) for m in rows}
    for p in ("fcfs", "least_load", "laps"):
        assert ttft[p, 1.5] > ttft[p, 1.0], ttft
