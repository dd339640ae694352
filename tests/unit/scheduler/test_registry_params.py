"""Registry: every name builds, parameters are checked, documented in one place."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from scheduler import registry
from scheduler.policies.cache_aware import CacheAwareConfig
from scheduler.policies.least_load import LeastLoadConfig, LeastLoadPolicy
from scheduler.policy import Policy
from sim.cli.policies import policies
from traces.errors import ConfigError

DOCS = Path(__file__).resolve().parents[3] / "docs" / "policies.md"
BASELINES = {"fcfs", "round_robin", "random", "least_load", "power_of_two", "cache_aware", "bucket"}


def test_every_name_builds_with_its_defaults_and_is_documented():
    assert set(registry.names()) >= BASELINES
    for name in registry.names():
        policy = registry.create(name)
        assert isinstance(policy, Policy) and policy.name == name
        cls = registry.policy_class(name)
        assert cls.source, f"{name} names no source"
        assert registry.policy_summary(cls), f"{name} has no docstring"
        for row in registry.describe(name):
            assert row.help and row.source, f"{name}.{row.param} lacks help or source"


def test_unknown_parameters_are_named_with_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"'cache_aware' takes no parameter 'cache_thresh'; it takes: cache_threshold, balance_abs_threshold",
    ):
        registry.create("cache_aware", cache_thresh=0.5)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"cache_threshold": "high"}, r"cache_threshold: expected float; got 'high'"),
        ({"cache_threshold": -0.1}, r"cache_threshold: expected a number >= 0.0; got -0.1"),
        ({"balance_abs_threshold": 2.5}, r"balance_abs_threshold: expected int; got 2.5"),
        ({"balance_abs_threshold": True}, r"balance_abs_threshold: expected int; got True"),
        (
            {"balance_rel_threshold": float("nan")},
            r"balance_rel_threshold: expected a number; got nan",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_policy_and_field(params, message):
    with pytest.raises(ConfigError, match=r"policy 'cache_aware': " + message):
        registry.create("cache_aware", **params)


def test_strings_from_the_command_line_are_read_as_the_fields_type():
    cfg = registry.create(
        "cache_aware", cache_threshold="0.5", balance_abs_threshold="10", balance_rel_threshold=2
    ).config
    assert cfg == CacheAwareConfig(
        cache_threshold=0.5, balance_abs_threshold=10, balance_rel_threshold=2.0
    )
    assert isinstance(cfg.balance_rel_threshold, float)


def test_configs_check_themselves_and_policies_take_a_config_or_parameters():
    with pytest.raises(ConfigError, match="metric"):
        LeastLoadConfig(metric="bytes")  # type: ignore[arg-type]
    assert LeastLoadPolicy(LeastLoadConfig(metric="tokens")).config.metric == "tokens"
    with pytest.raises(ConfigError, match="not both"):
        LeastLoadPolicy(LeastLoadConfig(), metric="tokens")
    with pytest.raises(ConfigError, match="expected a LeastLoadConfig; got CacheAwareConfig"):
        LeastLoadPolicy(CacheAwareConfig())  # type: ignore[arg-type]


def test_a_policys_signature_shows_its_parameters():
    sig = inspect.signature(registry.policy_class("power_of_two"))
    assert sig.parameters["seed"].default == 0
    assert "metric" in inspect.signature(registry.policy_class("least_load")).parameters


def test_describe_lists_parameters_with_type_default_unit_and_source():
    rows = {(r.policy, r.param): r for r in registry.describe()}
    ca = rows[("cache_aware", "balance_rel_threshold")]
    assert (ca.type, ca.default, ca.unit) == ("float", 1.5, "ratio")
    assert "router_args" in ca.source
    b = rows[("bucket", "adjust_interval_s")]
    assert (b.type, b.default, b.unit) == ("float", 5.0, "s")
    assert rows[("least_load", "metric")].type == "'requests' | 'tokens'"
    assert not [r for r in rows.values() if r.policy in ("fcfs", "round_robin")]


def test_the_committed_docs_are_up_to_date():
    expected = registry.policy_docs_markdown()
    assert DOCS.read_text(encoding="utf-8") == expected, (
        "docs/policies.md is stale: run `llmsched policies --markdown > docs/policies.md`"
    )
    for name in registry.names():
        assert f"## `{name}`" in expected


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(policies)
    app.command("noop")(lambda: None)  # two commands, so `policies` is a subcommand
    return app


def test_the_policies_command_prints_every_policy_and_parameter():
    result = CliRunner().invoke(_cli(), ["policies"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in BASELINES:
        assert name in result.output
    for param in ("cache_threshold", "balance_abs_threshold_tokens", "metric", "seed"):
        assert param in result.output
    md = CliRunner().invoke(_cli(), ["policies", "--markdown"])
    assert md.exit_code == 0 and md.output == registry.policy_docs_markdown()
