"""A profile file that is not a profile is one line naming the file, from the reader and the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.profile import load_profile
from sim.cli import app
from traces.bundled import bundled_path
from traces.errors import ConfigError


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\x00\x01\x02\xff\xfe", "not a profile: the file is not text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not a profile: the file is not text"),
        (b"garbage\n", ":1: not valid JSON"),
        (b"[1, 2]\n", "field '(top level)'"),
    ],
)
def test_a_file_that_is_not_a_profile_is_named(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "profile.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"{path.name}.*{re.escape(says)}"):
        load_profile(path)


def test_simulate_with_a_binary_profile_exits_with_one_line(tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    profile.write_bytes(b"\x00\x01\x02\xff")
    args = ["simulate", "--trace", str(bundled_path("burstgpt-synthetic")), "--profile"]
    result = CliRunner().invoke(app, [*args, str(profile), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "not a profile" in " ".join(result.output.split())
    assert "Traceback" not in result.output
