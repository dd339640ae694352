"""Configuration files and their errors: TOML or YAML tables, checked by pydantic models.

Scenario files (:mod:`sim.scenario`) and the router's config file
(:mod:`scheduler.router.config`) are read the same way and report problems
the same way: one line per bad key, as ``key.path[0].name: problem``, with
the known keys listed when a key is unknown.
"""

from __future__ import annotations

import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from traces.errors import ConfigError

__all__ = ["read_table_file", "validation_messages"]


def read_table_file(path: str | Path) -> dict[str, Any]:
    """The top-level table of a TOML file, or of a YAML file (``.yaml``, ``.yml``).

    Raises:
        ConfigError: no such file, bad syntax, or not a table at the top
            level; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "no such file"
        raise ConfigError(f"{path}: {what}; expected a TOML or YAML file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as text: {exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # tomllib and yaml raise their own syntax errors
        kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "TOML"
        raise ConfigError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of keys at the top level")
    return data


def validation_messages(exc: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """``key.path[0].name: problem`` for each error; unknown keys list the known ones."""
    out = []
    for err in exc.errors():
        loc = err["loc"]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", msg.removeprefix("Value error, ")))
        elif err["type"] == "extra_forbidden" and model is not None:
            known = _known_keys(model, loc[:-1])
            if known:
                msg = f"unknown key; known keys here: {', '.join(known)}"
        out.append(f"{where}: {msg}" if where else msg)
    return out


def _known_keys(model: Any, loc: tuple) -> list[str]:
    """Field names of the model reached by walking ``loc`` from ``model`` ([] if lost)."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            args = typing.get_args(tp)
            tp = args[0] if args else None
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    """``X`` from ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp
