"""Policy registry: names users type mapped to policy classes and their parameters.

Register a class with ``@register("name")``; build one with
``create("name", **params)``. Duplicate and unknown names raise
``ValueError`` listing the known names. The built-in policies
(``scheduler.policies``) are loaded on first use.

Parameters: a policy declares them as a frozen dataclass deriving from
:class:`PolicyConfig`, named in its ``config_class``, each field made with
:func:`param` (default, help text, source, bounds). :func:`create` checks the
names and values (:class:`~traces.errors.ConfigError`, a ``ValueError``,
naming the field), reading strings as the field's type so CLI and scenario
values work as typed. A policy without ``config_class`` takes its keyword
constructor parameters unchecked. :func:`describe` lists every parameter;
``llmsched policies`` and ``docs/policies.md`` (:func:`policy_docs_markdown`)
are built from it.

Prefill/decode disaggregation: :func:`create_pd` pairs any prefill policy with
any routing policy for the decode instances.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import operator
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Literal, TypeVar

from scheduler.policy import Policy
from traces.errors import ConfigError

__all__ = [
    "ParamInfo",
    "PolicyConfig",
    "create",
    "create_pd",
    "describe",
    "make_config",
    "names",
    "param",
    "policy_class",
    "policy_docs_markdown",
    "policy_summary",
    "register",
]

P = TypeVar("P", bound=type[Policy])

_REGISTRY: dict[str, type[Policy]] = {}
_builtins_loaded = False

#: Unit shown for a parameter whose name ends so (names carry units).
_UNIT_SUFFIXES = (("_ms", "ms"), ("_s", "s"), ("_tokens", "tokens"), ("_blocks", "blocks"))
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("scheduler.policies")


def _known() -> str:
    return ", ".join(sorted(_REGISTRY)) or "(none)"


# -- parameters -----------------------------------------------------------------


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

    #: The policy this config belongs to (set by :func:`register`), for messages.
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
    _refuse_unknown(cls.name or cls.__name__, params, accepted)
    return cfg_cls(**params)


def _refuse_unknown(name: str, params: Mapping[str, Any], accepted: list[str]) -> None:
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"policy {name!r} takes no parameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted) or '(none)'}"
        )


def _signature(cfg_cls: type) -> inspect.Signature:
    """``(config=None, /, *, field=default, ...)``: what the constructor accepts."""
    hints = _hints(cfg_cls)
    ps = [inspect.Parameter("config", inspect.Parameter.POSITIONAL_ONLY, default=None)]
    ps += [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
        )
        for f in dataclasses.fields(cfg_cls)
    ]
    return inspect.Signature(ps)


# -- registering and building ---------------------------------------------------------


def register(name: str) -> Callable[[P], P]:
    """Class decorator: register a :class:`Policy` subclass under ``name``.

    Sets the class's :attr:`Policy.name`, and with a ``config_class`` its
    signature, so ``inspect.signature`` shows the parameters.

    Raises:
        ValueError: the name is taken, or the class is not a Policy.
    """

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise ValueError(f"@register({name!r}) needs a Policy subclass, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(
                f"policy {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
                f"known policies: {_known()}"
            )
        cls.name = name
        if cls.config_class is not None:
            if issubclass(cls.config_class, PolicyConfig):
                cls.config_class.policy_name = name
            cls.__signature__ = _signature(cls.config_class)  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return decorate


def policy_class(name: str) -> type[Policy]:
    """The class registered under ``name``.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known policies: {_known()}") from None


def create(name: str, **params: Any) -> Policy:
    """Build the policy registered under ``name`` with keyword ``params``.

    Raises:
        ValueError: unknown name. ConfigError (a ValueError): a parameter the
            policy does not take (the message lists the ones it does) or a bad
            value (the message names the field).
    """
    cls = policy_class(name)
    if cls.config_class is not None:
        return cls(make_config(cls, None, params))  # type: ignore[call-arg]
    accepted = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    _refuse_unknown(name, params, accepted)
    return cls(**params)


def create_pd(
    prefill: str,
    decode: str,
    *,
    prefill_params: Mapping[str, Any] | None = None,
    decode_params: Mapping[str, Any] | None = None,
) -> Policy:
    """A prefill/decode pair: ``prefill`` places arrivals, ``decode`` picks decode instances.

    The prefill side may be any policy; the decode side must be a routing
    policy (:class:`scheduler.routing.RoutingPolicy`).

    Raises:
        ValueError: unknown name. ConfigError: bad parameters, or a decode
            policy that is not a routing policy (the message lists those).
    """
    from scheduler.policies.pd import PDPolicy
    from scheduler.routing import RoutingPolicy

    if not issubclass(policy_class(decode), RoutingPolicy):
        routing = [n for n in names() if issubclass(_REGISTRY[n], RoutingPolicy)]
        raise ConfigError(
            f"decode policy {decode!r} cannot choose decode instances; "
            f"routing policies: {', '.join(routing)}"
        )
    pre = create(prefill, **dict(prefill_params or {}))
    dec = create(decode, **dict(decode_params or {}))
    return PDPolicy(pre, dec)  # type: ignore[arg-type]


def names() -> tuple[str, ...]:
    """Registered policy names, sorted."""
    _load_builtins()
    return tuple(sorted(_REGISTRY))


# -- documentation --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParamInfo:
    """One policy parameter as :func:`describe` lists it."""

    policy: str
    param: str
    type: str
    default: Any
    help: str
    unit: str = ""
    source: str = ""


def describe(name: str | None = None) -> list[ParamInfo]:
    """Every parameter of the policy ``name`` (of every policy when None), in declaration order."""
    rows: list[ParamInfo] = []
    for n in names() if name is None else (name,):
        cls = policy_class(n)
        if cls.config_class is not None:
            hints = _hints(cls.config_class)
            for f in dataclasses.fields(cls.config_class):
                unit = f.metadata.get("unit")
                if unit is None:
                    unit = next((u for s, u in _UNIT_SUFFIXES if f.name.endswith(s)), "")
                rows.append(
                    ParamInfo(
                        n,
                        f.name,
                        _type_name(hints[f.name]),
                        f.default,
                        f.metadata.get("help", ""),
                        unit,
                        f.metadata.get("source", ""),
                    )
                )
            continue
        for p in inspect.signature(cls).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                ann = p.annotation if p.annotation is not p.empty else ""
                rows.append(ParamInfo(n, p.name, str(ann), p.default, ""))
    return rows


def policy_summary(cls: type[Policy]) -> str:
    """The first paragraph of a policy class's docstring, on one line."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def policy_docs_markdown() -> str:
    """``docs/policies.md``: every policy, its parameters, defaults, units and sources."""
    out = [
        "# Policies",
        "",
        "Generated from the policy config classes by "
        "`scheduler.registry.policy_docs_markdown()` (`llmsched policies --markdown`); "
        "do not edit by hand. Pick a policy with `--policy NAME` and set a parameter "
        "with `--policy-param KEY=VALUE`.",
        "",
        "Prefill/decode disaggregation: any policy places arrivals on the prefill "
        "instances, and any routing policy below (marked *routing*) picks the decode "
        "instance for each prefilled request "
        "(`scheduler.registry.create_pd(prefill, decode, ...)`). Without a decode "
        "policy the driver takes the least-loaded decode instance.",
    ]
    from scheduler.routing import RoutingPolicy

    for n in names():
        cls = policy_class(n)
        kind = " (*routing*)" if issubclass(cls, RoutingPolicy) else ""
        out += ["", f"## `{n}`{kind}", "", policy_summary(cls)]
        if cls.source:
            out += ["", f"Source: {cls.source}"]
        detail = (inspect.getdoc(sys.modules[cls.__module__]) or "").partition("\n\n")[2]
        if detail:
            out += ["", detail]
        rows = describe(n)
        if not rows:
            out += ["", "No parameters."]
            continue
        out += [
            "",
            "| parameter | type | default | unit | meaning | source |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            cells = (f"`{r.param}`", r.type, f"`{r.default!r}`", r.unit, r.help, r.source)
            out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"
