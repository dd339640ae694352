"""``llmsched policies``: a list that fits a terminal, one policy in full, every detail."""

from __future__ import annotations

from typer.testing import CliRunner

from scheduler.registry import names
from sim.cli import app

runner = CliRunner()


def policies(*args: str):
    return runner.invoke(app, ["policies", *args], env={"COLUMNS": "100"})


def flat(text: str) -> str:
    return " ".join(text.split())


def test_the_list_has_one_entry_per_policy_and_fits_a_terminal():
    brief, full = policies(), policies("--all")
    assert brief.exit_code == 0 and full.exit_code == 0, brief.output + full.output
    for name in names():
        assert name in brief.output
    assert len(brief.output.splitlines()) <= 50  # a terminal of 100 x 50
    assert len(full.output.splitlines()) > 3 * len(brief.output.splitlines())
    assert "llmsched policies NAME" in flat(brief.output)
    assert "cache_threshold" in brief.output  # parameter names, not their details


def test_a_name_shows_that_policy_alone_in_full():
    result = policies("least_load")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "least_load" in text and "metric" in text and "'requests'" in text
    assert "cache_aware" not in text and "round_robin" not in text


def test_fcfs_routing_reads_apart_from_least_load():
    text = flat(policies("fcfs").output)
    assert "fewest outstanding requests" in text and "ties to fewer in-flight tokens" in text
    assert "FCFS" in text


def test_an_unknown_name_lists_the_known_ones():
    result = policies("lifo")
    assert result.exit_code == 2
    assert "unknown policy 'lifo'; known policies: bucket, cache_aware, fcfs" in flat(result.output)
    assert "Traceback" not in result.output
