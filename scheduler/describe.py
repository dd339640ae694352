"""Models and devices outside the catalogue, described by the user.

Wherever a model or GPU name is taken (``--model``, ``--gpu``, scenario
files' ``cluster.model`` and ``cluster.gpu``, :func:`scheduler.hardware.model_spec`
and :func:`~scheduler.hardware.gpu_spec`), a description may stand in:

* a model's Hugging Face ``config.json`` (a path ending in ``.json``, or
  a folder holding one, such as a downloaded model): ``num_hidden_layers``, ``hidden_size``,
  ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
  ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``,
  ``torch_dtype``, ``tie_word_embeddings``, and the q/k/v biases of
  Qwen2-style models (``model_type`` ``qwen2``, or ``attention_bias``);
* a model as ``KEY=VALUE`` pairs: ``layers=4,hidden=256,heads=4,kv_heads=2,
  ffn=1024,vocab=32000`` with optional ``name``, ``head_dim`` (default
  hidden / heads), ``context`` (default 4096), ``dtype`` (``bf16``,
  ``fp16``, ``fp32``, ``fp8``, ``int8``; default ``bf16``), ``qkv_bias`` and
  ``tied`` (true or false);
* a device as ``KEY=VALUE`` pairs, or a JSON file of them:
  ``name=xeon-8480,flops=2e12,bandwidth=2e11,memory=256e9`` (peak dense
  FLOP/s at the model's dtype, memory bandwidth in B/s, memory in bytes),
  with optional ``link`` (B/s between devices of one tensor-parallel group)
  and ``network`` (B/s between instances, for PD transfers), both 12.5e9
  (100 GbE) when not given. A CPU engine is such a device.

Every description gets the name it gives (or its file's folder), so
summaries and profiles name the engine that was described, never a
catalogue entry. Errors name the file or the key and what was expected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from scheduler.hardware import GpuSpec, ModelSpec
from traces.errors import ConfigError

__all__ = ["describes_a_file", "device_from", "model_from", "spec_fields"]

_DTYPE_BYTES = {
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "half": 2,
    "fp32": 4,
    "float32": 4,
    "float": 4,
    "fp8": 1,
    "float8": 1,
    "int8": 1,
}

#: Interconnect assumed when a device description gives none: 100 GbE.
DEFAULT_LINK_BPS = 12.5e9


def describes_a_file(text: str) -> bool:
    """Whether ``text`` names a description file rather than a catalogue entry."""
    return text.strip().lower().endswith(".json") or (Path(text) / "config.json").is_file()


def _pairs(text: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(
                f"{what} description {text!r}: expected KEY=VALUE pairs; got {item!r}"
            )
        out[key.strip().lower()] = value.strip()
    return out


def _number(where: str, key: str, value: Any, *, integer: bool) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{where}: {key!r}: expected {kind}; got {value!r}") from None
    if integer and number != int(number):
        raise ConfigError(f"{where}: {key!r}: expected a positive integer; got {value!r}")
    return int(number) if integer else number


def _flag(where: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"{where}: {key!r}: expected true or false; got {value!r}")


def _dtype(where: str, value: Any) -> int:
    size = _DTYPE_BYTES.get(str(value).strip().lower())
    if size is None:
        raise ConfigError(
            f"{where}: 'dtype': expected one of {', '.join(sorted(_DTYPE_BYTES))}; got {value!r}"
        )
    return size


def _build_model(where: str, name: str, fields: dict[str, Any]) -> ModelSpec:
    try:
        spec = ModelSpec(name=name, **fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if spec.n_heads % spec.n_kv_heads:
        raise ConfigError(
            f"{where}: {spec.n_heads} attention heads do not split into "
            f"{spec.n_kv_heads} KV-head groups"
        )
    return spec


def _model_from_config(path: Path) -> ModelSpec:
    where = str(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read model config: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not a JSON model config: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object (a Hugging Face config.json)")
    raw = raw.get("text_config", raw) if "num_hidden_layers" not in raw else raw

    def need(key: str) -> int:
        if key not in raw:
            raise ConfigError(f"{where}: field {key!r}: required in a model config")
        return _number(where, key, raw[key], integer=True)

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    kv = _number(where, "num_key_value_heads", raw.get("num_key_value_heads", heads), integer=True)
    head_dim = raw.get("head_dim") or hidden // heads
    bias = raw.get("attention_bias", raw.get("model_type") == "qwen2")
    name = raw.get("_name_or_path") or path.parent.name or path.stem
    return _build_model(
        where,
        str(name).rstrip("/").rsplit("/", 1)[-1],
        {
            "n_layers": need("num_hidden_layers"),
            "hidden_size": hidden,
            "n_heads": heads,
            "n_kv_heads": kv,
            "head_dim": _number(where, "head_dim", head_dim, integer=True),
            "intermediate_size": need("intermediate_size"),
            "vocab_size": need("vocab_size"),
            "context_length": _number(
                where,
                "max_position_embeddings",
                raw.get("max_position_embeddings", 4096),
                integer=True,
            ),
            "dtype_bytes": _dtype(where, raw.get("torch_dtype") or raw.get("dtype") or "bf16"),
            "qkv_bias": _flag(where, "attention_bias", bias),
            "tie_word_embeddings": _flag(
                where, "tie_word_embeddings", raw.get("tie_word_embeddings", False)
            ),
        },
    )


_MODEL_KEYS = {
    "layers": "n_layers",
    "hidden": "hidden_size",
    "heads": "n_heads",
    "kv_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "ffn": "intermediate_size",
    "vocab": "vocab_size",
    "context": "context_length",
}


def model_from(text: str) -> ModelSpec:
    """The model a ``config.json`` path (or its folder) or ``KEY=VALUE`` pairs describe.

    Raises:
        ConfigError: an unreadable file, a missing or malformed field or key.
    """
    if "=" not in text:
        path = Path(text)
        return _model_from_config(path / "config.json" if path.is_dir() else path)
    where = f"model description {text!r}"
    pairs = _pairs(text, "model")
    unknown = set(pairs) - {*_MODEL_KEYS, "name", "dtype", "qkv_bias", "tied"}
    if unknown:
        known = ", ".join([*_MODEL_KEYS, "name", "dtype", "qkv_bias", "tied"])
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; known keys: {known}")
    fields: dict[str, Any] = {}
    for key, field in _MODEL_KEYS.items():
        if key in pairs:
            fields[field] = _number(where, key, pairs[key], integer=True)
        elif key not in ("head_dim", "context", "kv_heads"):
            raise ConfigError(f"{where}: {key!r}: required (layers, hidden, heads, ffn, vocab)")
    fields.setdefault("n_kv_heads", fields["n_heads"])
    fields.setdefault("head_dim", fields["hidden_size"] // fields["n_heads"])
    fields.setdefault("context_length", 4096)
    fields["dtype_bytes"] = _dtype(where, pairs.get("dtype", "bf16"))
    fields["qkv_bias"] = _flag(where, "qkv_bias", pairs.get("qkv_bias", "false"))
    fields["tie_word_embeddings"] = _flag(where, "tied", pairs.get("tied", "false"))
    name = pairs.get("name") or (
        f"custom-{fields['n_layers']}L-{fields['hidden_size']}h-{fields['intermediate_size']}ffn"
    )
    return _build_model(where, name, fields)


_DEVICE_KEYS = ("name", "flops", "bandwidth", "memory", "link", "network")


def device_from(text: str) -> GpuSpec:
    """The device ``KEY=VALUE`` pairs (or a JSON file of them) describe.

    Raises:
        ConfigError: an unreadable file, a missing or malformed key.
    """
    if "=" in text:
        where, pairs = f"device description {text!r}", _pairs(text, "device")
        default_name = "custom-device"
    else:
        where = text
        try:
            pairs = json.loads(Path(text).read_text())
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read device: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: not a JSON device description: {exc}") from None
        if not isinstance(pairs, dict):
            raise ConfigError(f"{where}: expected a JSON object of {', '.join(_DEVICE_KEYS)}")
        default_name = Path(text).stem
    unknown = set(pairs) - set(_DEVICE_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; known keys: {', '.join(_DEVICE_KEYS)}"
        )
    for key in ("flops", "bandwidth", "memory"):
        if key not in pairs:
            raise ConfigError(
                f"{where}: {key!r}: required (flops: peak FLOP/s, bandwidth: memory B/s, "
                "memory: bytes)"
            )
    link = _number(where, "link", pairs.get("link", DEFAULT_LINK_BPS), integer=False)
    return GpuSpec(
        name=str(pairs.get("name") or default_name),
        peak_bf16_flops=_number(where, "flops", pairs["flops"], integer=False),
        hbm_bandwidth_Bps=_number(where, "bandwidth", pairs["bandwidth"], integer=False),
        memory_bytes=int(_number(where, "memory", pairs["memory"], integer=False)),
        nvlink_bandwidth_Bps=link,
        network_bandwidth_Bps=_number(
            where, "network", pairs.get("network", DEFAULT_LINK_BPS), integer=False
        ),
    )


def spec_fields(spec: ModelSpec | GpuSpec) -> dict[str, Any]:
    """A spec's given fields (not the derived ones), as a profile stores them."""
    derived = {"layer_params", "non_embedding_params", "total_params"}
    return {
        name: getattr(spec, name)
        for name in spec.__dataclass_fields__
        if name not in derived and spec.__dataclass_fields__[name].init
    }
