"""Policy parameters: the config classes policies declare, checked when built.

A policy declares its parameters as a frozen dataclass deriving from
:class:`PolicyConfig`, named in its ``config_class``, each field made with
:func:`param` (default, help text, source, bounds). Building a config checks
every value (:class:`~traces.errors.ConfigError`, a ``ValueError``, naming
the field), reading strings as the field's type, so CLI and scenario values
work as typed. :func:`make_config` is what a policy constructor calls;
:func:`config_params` lists a config class's parameters for the docs.

This module knows nothing of the registry (names -> classes,
:mod:`scheduler.registry`), so policy modules import it without importing
the registry, and the registry can import them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from traces.errors import ConfigError

if TYPE_CHECKING:
    from scheduler.policy import Policy

__all__ = [
    "ParamInfo",
    "PolicyConfig",
    "config_params",
    "config_signature",
    "make_config",
    "param",
    "refuse_unknown_params",
]

#: Unit shown for a parameter whose name ends so (names carry units).
_UNIT_SUFFIXES = (("_ms", "ms"), ("_s", "s"), ("_tokens", "tokens"), ("_blocks", "blocks"))
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def param(
    default: Any,
    *,
    help: str,
    source: str = "",
    unit: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """A :class:`PolicyConfig` field: default, help text, where the default comes from, bounds.

    ``unit`` defaults to the name's suffix (``_s``, ``_ms``, ``_tokens``,
    ``_blocks``); ``ge``/``gt``/``le`` bound numeric values.
    """
    meta = {"help": help, "source": source, "unit": unit, "ge": ge, "gt": gt, "le": le}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class PolicyConfig:
    """Base of policy configs: checks every field's type and bounds when built.

    Raises:
        ConfigError: a value of the wrong type or out of bounds; the message
            names the field and what was expected.
    """

    #: The policy this config belongs to (set by ``register``), for messages.
    policy_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        cls = type(self)
        owner = f"policy {cls.policy_name!r}" if cls.policy_name else cls.__name__
        hints = _hints(cls)
        for f in dataclasses.fields(self):
            value = _check(owner, f, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any) -> Any:
    """A value of type ``tp`` from ``value``, or raise ``TypeError``/``ValueError``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _coerce(arg, value)
                except (TypeError, ValueError):
                    continue
        raise TypeError
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise TypeError
    if isinstance(value, bool):
        raise TypeError  # True is an int to Python, never a count to a user
    if tp is int and isinstance(value, int | str):
        return int(value)  # int("2.5") raises: a count is never fractional
    if tp is float and isinstance(value, int | float | str):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise TypeError


def _check(owner: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    expected = _type_name(tp)
    try:
        value = _coerce(tp, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: {f.name}: expected {expected}; got {value!r}") from None
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{owner}: {f.name}: expected a number; got nan")
    if isinstance(value, int | float) and not isinstance(value, bool):
        for word, key, holds in (
            (">=", "ge", operator.ge),
            (">", "gt", operator.gt),
            ("<=", "le", operator.le),
        ):
            limit = f.metadata.get(key)
            if limit is not None and not holds(value, limit):
                raise ConfigError(
                    f"{owner}: {f.name}: expected a number {word} {limit}; got {value!r}"
                )
    return value


def make_config(
    cls: type[Policy], config: PolicyConfig | None = None, params: Mapping[str, Any] | None = None
) -> PolicyConfig:
    """The config a policy is built with: ``config`` as given, or ``params`` checked.

    Raises:
        ConfigError: both given, a parameter the policy does not take (the
            message lists the ones it does), or a bad value (names the field).
    """
    cfg_cls = cls.config_class
    if cfg_cls is None:
        raise ConfigError(f"policy {cls.name or cls.__name__!r} declares no config_class")
    if config is not None:
        if params:
            raise ConfigError(f"policy {cls.name!r}: give a config or parameters, not both")
        if not isinstance(config, cfg_cls):
            raise ConfigError(
                f"policy {cls.name!r}: expected a {cfg_cls.__name__}; got {type(config).__name__}"
            )
        return config
    params = dict(params or {})
    accepted = [f.name for f in dataclasses.fields(cfg_cls)]
    refuse_unknown_params(cls.name or cls.__name__, params, accepted)
    return cfg_cls(**params)


def refuse_unknown_params(name: str, params: Mapping[str, Any], accepted: list[str]) -> None:
    """Raise :class:`ConfigError` naming the parameters of ``params`` not in ``accepted``.

    The message lists the accepted ones, so a typo shows its fix.
    """
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"policy {name!r} takes no parameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted) or '(none)'}"
        )


def config_signature(cfg_cls: type) -> inspect.Signature:
    """``(config=None, /, *, field=default, ...)``: what a constructor taking ``cfg_cls`` accepts."""
    hints = _hints(cfg_cls)
    ps = [inspect.Parameter("config", inspect.Parameter.POSITIONAL_ONLY, default=None)]
    ps += [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
        )
        for f in dataclasses.fields(cfg_cls)
    ]
    return inspect.Signature(ps)


@dataclass(frozen=True, slots=True)
class ParamInfo:
    """One policy parameter as the registry's ``describe`` lists it."""

    policy: str
    param: str
    type: str
    default: Any
    help: str
    unit: str = ""
    source: str = ""


def config_params(policy: str, cfg_cls: type) -> list[ParamInfo]:
    """The parameters of the config class ``cfg_cls`` of policy ``policy``, in declaration order."""
    hints = _hints(cfg_cls)
    rows = []
    for f in dataclasses.fields(cfg_cls):
        unit = f.metadata.get("unit")
        if unit is None:
            unit = next((u for s, u in _UNIT_SUFFIXES if f.name.endswith(s)), "")
        rows.append(
            ParamInfo(
                policy,
                f.name,
                _type_name(hints[f.name]),
                f.default,
                f.metadata.get("help", ""),
                unit,
                f.metadata.get("source", ""),
            )
        )
    return rows
