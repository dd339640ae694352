"""Models and devices outside the catalogue: a config.json, KEY=VALUE pairs, a device file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from scheduler.calibration import fit_profile
from scheduler.cost_model import CostModel
from scheduler.describe import spec_fields
from scheduler.hardware import gpu_spec, model_spec
from scheduler.profile import save_profile
from traces.errors import ConfigError

LLAMA_8B_CONFIG = {
    "_name_or_path": "meta-llama/Llama-3.1-8B-Instruct",
    "model_type": "llama",
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}
CPU = "name=xeon-8480,flops=3e12,bandwidth=2.5e11,memory=256e9"


def _config(tmp_path: Path, **edits) -> Path:
    folder = tmp_path / "tiny-llama"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**LLAMA_8B_CONFIG, **edits}))
    return folder / "config.json"


def test_an_hf_config_gives_the_catalogue_shape(tmp_path: Path) -> None:
    spec = model_spec(str(_config(tmp_path)))
    catalogue = model_spec("llama-3.1-8b")
    assert spec.name == "Llama-3.1-8B-Instruct"
    assert dataclasses.replace(spec, name=catalogue.name) == catalogue
    assert spec.total_params == catalogue.total_params
    # The folder holding config.json works too.
    assert model_spec(str(_config(tmp_path).parent)) == spec


def test_a_qwen2_config_has_qkv_biases_and_fp32_is_four_bytes(tmp_path: Path) -> None:
    spec = model_spec(str(_config(tmp_path, model_type="qwen2", torch_dtype="float32")))
    assert spec.qkv_bias and spec.dtype_bytes == 4


def test_key_value_pairs_describe_a_small_model() -> None:
    spec = model_spec("name=tiny,layers=4,hidden=256,heads=4,kv_heads=2,ffn=1024,vocab=32000")
    assert (spec.name, spec.n_layers, spec.head_dim, spec.n_kv_heads) == ("tiny", 4, 64, 2)
    # About 18M parameters: embeddings and LM head dominate.
    assert 15e6 < spec.total_params < 21e6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("layers=4,hidden=256,heads=4,ffn=1024", r"'vocab': required"),
        ("layers=4,hidden=256,heads=4,ffn=1024,vocab=x", r"'vocab': expected a positive integer"),
        ("layers=4,hidden=256,heads=4,ffn=1024,vocab=9,colour=red", r"unknown key 'colour'"),
        ("layers=4,hidden=256,heads=4,ffn=1024,vocab=9,dtype=fp7", r"'dtype': expected one of"),
        ("layers=4,hidden=256,heads=6,kv_heads=4,ffn=1024,vocab=9", r"do not split into 4"),
    ],
)
def test_a_bad_model_description_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        model_spec(text)


def test_a_config_missing_a_field_names_it(tmp_path: Path) -> None:
    path = _config(tmp_path)
    raw = json.loads(path.read_text())
    del raw["intermediate_size"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config\.json: field 'intermediate_size': required"):
        model_spec(str(path))


def test_a_device_from_pairs_or_a_file(tmp_path: Path) -> None:
    cpu = gpu_spec(CPU)
    assert (cpu.name, cpu.peak_bf16_flops, cpu.memory_bytes) == ("xeon-8480", 3e12, 256 * 10**9)
    path = tmp_path / "xeon.json"
    path.write_text(json.dumps({"flops": 3e12, "bandwidth": 2.5e11, "memory": 256e9}))
    assert gpu_spec(str(path)).name == "xeon"
    with pytest.raises(ConfigError, match=r"'bandwidth': required"):
        gpu_spec("flops=3e12,memory=1e9")
    with pytest.raises(ConfigError, match=r"'flops': expected a positive number; got '-1'"):
        gpu_spec("flops=-1,bandwidth=1,memory=1")


def test_a_described_engine_is_priced_from_its_own_numbers() -> None:
    tiny = "name=tiny,layers=4,hidden=256,heads=4,kv_heads=2,ffn=1024,vocab=32000,dtype=fp32"
    cpu = CostModel.from_names(tiny, CPU)
    assert cpu.model.name == "tiny" and cpu.gpu.name == "xeon-8480"
    # Per-token GEMM cost and weight streaming scale with the device's own figures.
    h100 = CostModel.from_names(tiny, "h100")
    ratio = cpu.coefficients.linear_s_per_token / h100.coefficients.linear_s_per_token
    assert ratio == pytest.approx(989.5e12 / 3e12)
    ratio = cpu.coefficients.weight_read_s / h100.coefficients.weight_read_s
    assert ratio == pytest.approx(3.35e12 / 2.5e11)


def test_a_profile_of_a_described_engine_carries_its_description(tmp_path: Path) -> None:
    import pandas as pd

    config = str(_config(tmp_path))
    truth = CostModel.from_names(config, CPU)
    rows = [
        {
            "kind": "decode",
            "batch_size": b,
            "context_tokens": b * c,
            "latency_s": truth.decode_time_s(b, b * c) * 1.3,
        }
        for b in (1, 2, 4, 8)
        for c in (100, 1000)
    ]
    profile = fit_profile(pd.DataFrame(rows), config, CPU)
    assert profile.gpu == "xeon-8480"
    assert profile.device_description == spec_fields(gpu_spec(CPU))
    path = tmp_path / "p.json"
    save_profile(profile, path)
    fitted = CostModel.from_names(config, CPU, profile=path)
    assert fitted.decode_time_s(4, 4000) == pytest.approx(
        truth.decode_time_s(4, 4000) * 1.3, rel=0.01
    )
    # Never silently the catalogue's engine: the same profile refuses an H100.
    with pytest.raises(
        ConfigError, match=r"profile is for \('Llama-3.1-8B-Instruct', 'xeon-8480', 1\)"
    ):
        CostModel.from_names("llama-3.1-8b", "h100", profile=path)
