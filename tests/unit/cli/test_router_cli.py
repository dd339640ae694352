"""``llmsched router``'s flags: what they build, and one clear line for what is wrong."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sim.cli import app
from sim.cli.router import _backends, _Protocol

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["router", *args])


def test_no_backend_says_how_to_give_one_brackets_and_all() -> None:
    out = run()
    assert out.exit_code == 2
    assert "no backends; give --backend URL (or [[backends]] in --config)" in out.output
    assert "Traceback" not in out.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prefill", "http://a:1"], "--prefill and --decode go together"),
        (
            ["--backend", "http://a:1", "--prefill", "http://b:1", "--decode", "http://c:1"],
            "cannot be mixed",
        ),
        (["--backend", "ftp://a:1"], "http:// or https://"),
        (["--backend", "http://a:1", "--policy", "fifo"], "fifo"),
        (["--backend", "http://a:1", "--policy-param", "window_ms"], "KEY=VALUE"),
        (["--backend", "http://a:1", "--config", "/nonexistent/router.toml"], "no such file"),
    ],
)
def test_bad_flags_get_one_line_naming_them(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.exit_code == 2, out.output
    assert message in out.output and "Traceback" not in out.output


def test_pd_flags_make_prefill_and_decode_backends_with_their_bootstrap_ports() -> None:
    got = _backends(
        None, ["http://p1:1", "http://p2:1"], ["http://d:1"], [9000], _Protocol.sglang, "sk-k"
    )
    assert [(b["url"], b["role"], b.get("bootstrap_port")) for b in got] == [
        ("http://p1:1", "prefill", 9000),
        ("http://p2:1", "prefill", None),
        ("http://d:1", "decode", None),
    ]
    assert all(b["protocol"] == "sglang" and b["api_key"] == "sk-k" for b in got)
