"""Scenario files: what parses, and what a broken file says (file, key path, problem)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.scenario import ScenarioError, load_scenario, parse_scenario
from traces.bundled import bundled_path

REPO = Path(__file__).resolve().parents[3]

GOOD = """
name = "tiny"
loads = [0.5, 2.0]
seeds = [0, 1]

[trace]
path = "tiny.parquet"

[trace.transforms]
max_requests = 50

[cluster]
model = "llama-3.1-8b"
gpu = "h100"
instances = 2

[cluster.limits]
max_running_requests = 64

[slo]
ttft_ms = 500

[[policies]]
name = "fcfs"

[[policies]]
name = "random"
label = "rnd"
params = { seed = 3 }
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    target = tmp_path / "tiny.parquet"
    target.write_bytes(b"PAR1")  # existence is all parsing checks
    return target


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    return str(info.value)


def test_a_good_file_gives_every_point_with_paths_from_its_folder(tmp_path, trace_file):
    scenario = load_scenario(write(tmp_path, GOOD))
    runs = scenario.runs()
    assert [(r.policy.display, r.load, r.seed) for r in runs] == [
        ("fcfs", 0.5, 0),
        ("fcfs", 0.5, 1),
        ("fcfs", 2.0, 0),
        ("fcfs", 2.0, 1),
        ("rnd", 0.5, 0),
        ("rnd", 0.5, 1),
        ("rnd", 2.0, 0),
        ("rnd", 2.0, 1),
    ]
    assert runs[0].trace.path == str(trace_file.resolve())
    assert runs[0].cluster.limits.max_running_requests == 64
    assert runs[0].slo.ttft_s == 0.5 and runs[0].slo.tpot_s is None
    assert runs[0].trace.transforms.max_requests == 50


def test_yaml_reads_like_toml(tmp_path, trace_file):
    yaml_text = """
loads: [1.0]
trace: {path: tiny.parquet}
cluster: {pd: "1:2"}
policies:
  - {name: fcfs, decode: round_robin}
"""
    scenario = load_scenario(write(tmp_path, yaml_text, "s.yaml"))
    assert scenario.policies[0].display == "fcfs+round_robin"
    assert scenario.cluster.pd == "1:2"
    unquoted = write(tmp_path, yaml_text.replace('"1:2"', "1:2"), "u.yaml")
    with pytest.raises(ScenarioError, match=r'cluster\.pd: expected a quoted "P:D" string'):
        load_scenario(unquoted)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # unknown key: named with its path, and the keys that are known there
        ("instances = 2", "instances = 2\ngpus = 4", "cluster.gpus: unknown key; known keys here:"),
        # wrong type
        (
            "instances = 2",
            'instances = "two"',
            "cluster.instances: Input should be a valid integer",
        ),
        # out of range
        ("instances = 2", "instances = 0", "cluster.instances: Input should be greater than 0"),
        # a parameter the policy does not take
        ("params = { seed = 3 }", "params = { sede = 3 }", "policies[1].params: policy 'random'"),
        # a parameter of the wrong type
        ("params = { seed = 3 }", 'params = { seed = "x" }', "policies[1].params: policy 'random'"),
        # a missing trace file, resolved against the scenario's folder
        ('path = "tiny.parquet"', 'path = "gone.csv"', "trace.path: no such file:"),
        # a transform of the trace
        ("max_requests = 50", "max_requests = -1", "trace.transforms.max_requests:"),
        # an engine limit under its SGLang name
        ("max_running_requests = 64", "max_running_requests = 0", "max_running_requests:"),
        ("[slo]", "[slo]\ntpot_ms = -5", "slo.tpot_ms: Input should be greater than 0"),
        ("loads = [0.5, 2.0]", "loads = [0.5, -2.0]", "loads: each load must be a positive"),
        ('label = "rnd"', 'label = "fcfs"', "policies: labels must differ; repeated: fcfs"),
        ('gpu = "h100"', 'gpu = "tpu9"', "cluster.gpu: unknown GPU 'tpu9'"),
        ('name = "random"', 'name = "random"\ndecode = "fcfs"', "a decode policy needs cluster.pd"),
    ],
)
def test_a_broken_file_names_the_file_the_key_and_the_problem(
    tmp_path, trace_file, old, new, expected
):
    assert old in GOOD
    message = error_of(tmp_path, GOOD.replace(old, new, 1))
    assert message.startswith(str(tmp_path / "s.toml"))
    assert expected in message


def test_a_trace_needs_exactly_one_source(tmp_path):
    message = error_of(
        tmp_path, '[trace]\nbundled = "ragpulse"\npath = "x"\n[[policies]]\nname="fcfs"'
    )
    assert "trace.path: no such file" in message  # the path is checked on its own first
    message = error_of(tmp_path, "[trace]\n[[policies]]\nname='fcfs'")
    assert "trace: set exactly one of path, bundled, generator" in message


def test_generator_parameters_are_checked_when_read(tmp_path):
    text = '[trace.generator]\npreset = "chat"\nparams = {rate_rps = -1}\n[[policies]]\nname="fcfs"'
    assert "trace.generator: synthetic preset 'chat': rate_rps:" in error_of(tmp_path, text)


def test_syntax_errors_and_missing_files_name_the_file(tmp_path):
    assert "s.toml: not valid TOML" in error_of(tmp_path, "loads = [1,\n")
    with pytest.raises(ScenarioError, match=r"nope\.toml: no such scenario file"):
        load_scenario(tmp_path / "nope.toml")


def test_an_unregistered_policy_parses_but_cannot_run(tmp_path, trace_file):
    scenario = load_scenario(write(tmp_path, GOOD.replace('"random"', '"lifo"')))
    assert scenario.policies[1].name == "lifo"  # a later version may register it
    with pytest.raises(ScenarioError) as info:
        scenario.check_policies("s.toml")
    message = str(info.value)
    assert "s.toml: policies[1].name: unknown policy 'lifo'; known policies:" in message
    assert "fcfs" in message and "round_robin" in message


def test_bundled_names_are_checked():
    with pytest.raises(ScenarioError, match=r"trace.bundled: no bundled trace 'nope'; known: .*"):
        parse_scenario({"trace": {"bundled": "nope"}, "policies": [{"name": "fcfs"}]})
    ok = parse_scenario({"trace": {"bundled": "ragpulse"}, "policies": [{"name": "fcfs"}]})
    assert ok.trace.file == bundled_path("ragpulse") and ok.loads == [1.0] and ok.seeds == [0]


def test_a_trace_path_takes_the_bundled_and_generator_forms_of_the_command_line():
    ok = parse_scenario({"trace": {"path": "bundled:ragpulse"}, "policies": [{"name": "fcfs"}]})
    assert ok.trace.bundled == "ragpulse" and ok.trace.file == bundled_path("ragpulse")
    gen = parse_scenario({"trace": {"path": "generator:chat"}, "policies": [{"name": "fcfs"}]})
    assert gen.trace.generator is not None and gen.trace.generator.preset == "chat"
    with pytest.raises(ScenarioError, match="no bundled trace 'nope'"):
        parse_scenario({"trace": {"path": "bundled:nope"}, "policies": [{"name": "fcfs"}]})
    with pytest.raises(ScenarioError, match="both name the workload"):
        parse_scenario(
            {
                "trace": {"path": "bundled:ragpulse", "bundled": "ragpulse"},
                "policies": [{"name": "fcfs"}],
            }
        )


@pytest.mark.parametrize("name", ["demo.toml", "demo-chat.toml", "laps.toml", "pd.yaml"])
def test_shipped_examples_validate(name):
    scenario = load_scenario(REPO / "examples" / name)
    assert scenario.runs()


def test_simulator_options_are_cluster_keys_checked_when_read(tmp_path, trace_file):
    options = 'prefix_knowledge = "oracle"\npoll_interval_ms = 50\nbatch_hints = "group"\n'
    text = GOOD.replace("instances = 2\n", "instances = 2\n" + options)
    runs = load_scenario(write(tmp_path, text)).runs()
    assert {(r.cluster.prefix_knowledge, r.cluster.batch_hints) for r in runs} == {
        ("oracle", "group")
    }
    assert runs[0].cluster.poll_interval_ms == 50.0
    bad = error_of(tmp_path, GOOD.replace("instances = 2", 'instances = 2\nbatch_hints = "cuda"'))
    assert "cluster.batch_hints: Input should be 'graph' or 'group'" in bad
    bad = error_of(tmp_path, GOOD.replace("instances = 2", "instances = 2\npoll_interval_ms = -1"))
    assert "cluster.poll_interval_ms: Input should be greater than or equal to 0" in bad
    bad = error_of(tmp_path, GOOD.replace("max_running_requests = 64", "cuda_graph_max_bs = 1.5"))
    assert "cluster.limits.cuda_graph_max_bs" in bad


def test_the_scenario_choices_are_the_simulators():
    import typing

    from sim.loop import BATCH_HINT_MODES, PREFIX_KNOWLEDGE
    from sim.specs import ClusterSpec

    fields = ClusterSpec.model_fields
    assert typing.get_args(fields["prefix_knowledge"].annotation) == PREFIX_KNOWLEDGE
    assert typing.get_args(fields["batch_hints"].annotation) == BATCH_HINT_MODES
