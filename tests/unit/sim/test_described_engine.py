"""A scenario file names a model and device outside the catalogue, by files beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.runner import build_engine
from sim.scenario import ScenarioError, load_scenario

CONFIG = {
    "_name_or_path": "org/tiny-llama",
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 1024,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "torch_dtype": "float32",
}


def _scenario(folder: Path, model: str, gpu: str) -> Path:
    (folder / "models" / "tiny").mkdir(parents=True)
    (folder / "models" / "tiny" / "config.json").write_text(json.dumps(CONFIG))
    (folder / "xeon.json").write_text(
        json.dumps({"flops": 3e12, "bandwidth": 2.5e11, "memory": 64e9})
    )
    path = folder / "cpu.toml"
    path.write_text(
        f'name = "cpu"\n[trace]\nbundled = "azure-code"\n'
        f'[cluster]\nmodel = "{model}"\ngpu = "{gpu}"\n[[policies]]\nname = "fcfs"\n'
    )
    return path


def test_files_beside_the_scenario_describe_its_engine(tmp_path: Path) -> None:
    scenario = load_scenario(_scenario(tmp_path, "models/tiny/config.json", "xeon.json"))
    cost, _limits = build_engine(scenario.cluster)
    assert (cost.model.name, cost.gpu.name) == ("tiny-llama", "xeon")
    assert (cost.model.n_layers, cost.model.dtype_bytes, cost.gpu.memory_bytes) == (
        4,
        4,
        64 * 10**9,
    )


def test_a_missing_description_file_names_the_scenario_field(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"cpu\.toml: cluster\.model: no such file"):
        load_scenario(_scenario(tmp_path, "models/absent/config.json", "xeon.json"))
