"""Policy registry: the names users type mapped to policy classes.

Register a class with ``@register("name")``; build one with
``create("name", **params)``. Duplicate names raise ``ValueError``; an
unknown name raises :func:`unknown_policy`'s error, which lists the known
names (the one message for it, wherever a name is looked up). The built-in
policies (``scheduler.policies``) are loaded on first use, so importing this
module imports no policy.

Parameters are declared in :mod:`scheduler.params` (``PolicyConfig``,
``param``, ``make_config``; re-exported here for existing imports).
:func:`create` checks them; :func:`describe` lists them; ``llmsched
policies`` and ``docs/policies.md`` (:func:`policy_docs_markdown`) are built
from it.

Prefill/decode disaggregation: :func:`create_pd` pairs any prefill policy
with a policy that can choose decode instances (:func:`can_choose_decode`:
the routing policies).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from scheduler.params import (
    ParamInfo,
    PolicyConfig,
    config_params,
    config_signature,
    make_config,
    param,
    refuse_unknown_params,
)
from scheduler.policy import Policy
from traces.errors import ConfigError

__all__ = [
    "ParamInfo",
    "PolicyConfig",
    "can_choose_decode",
    "check_decode_policy",
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
    "routing_names",
    "unknown_policy",
]

P = TypeVar("P", bound=type[Policy])

_REGISTRY: dict[str, type[Policy]] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("scheduler.policies")


def _known() -> str:
    return ", ".join(sorted(_REGISTRY)) or "(none)"


def unknown_policy(name: object) -> ConfigError:
    """The error for a policy name nobody registered; the message lists the known names.

    A :class:`~traces.errors.ConfigError` (so a ``ValueError``); callers
    prefix where the name came from (a flag, a key path) when they know it.
    """
    _load_builtins()
    return ConfigError(f"unknown policy {name!r}; known policies: {_known()}")


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
            cls.__signature__ = config_signature(cls.config_class)  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return decorate


def policy_class(name: str) -> type[Policy]:
    """The class registered under ``name``.

    Raises:
        ConfigError: unknown name (:func:`unknown_policy`).
    """
    _load_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise unknown_policy(name) from None


def create(name: str, **params: Any) -> Policy:
    """Build the policy registered under ``name`` with keyword ``params``.

    Raises:
        ConfigError (a ValueError): unknown name (:func:`unknown_policy`), a
            parameter the policy does not take (the message lists the ones
            it does) or a bad value (the message names the field).
    """
    cls = policy_class(name)
    if cls.config_class is not None:
        return cls(make_config(cls, None, params))  # type: ignore[call-arg]
    accepted = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    refuse_unknown_params(name, params, accepted)
    return cls(**params)


def _is_routing(cls: type[Policy]) -> bool:
    # Imported here: scheduler.routing imports this module (for the config
    # helpers it re-exports) until it takes them from scheduler.params.
    from scheduler.routing import RoutingPolicy

    return issubclass(cls, RoutingPolicy)


def can_choose_decode(name: str) -> bool:
    """Whether the policy ``name`` can choose decode instances under PD (a routing policy).

    The one definition: ``create_pd``, the scenario checks, the runner and
    ``llmsched policies`` all ask this.

    Raises:
        ConfigError: unknown name (:func:`unknown_policy`).
    """
    return _is_routing(policy_class(name))


def routing_names() -> tuple[str, ...]:
    """The registered policies that can choose decode instances, sorted."""
    return tuple(n for n in names() if _is_routing(_REGISTRY[n]))


def check_decode_policy(name: str) -> None:
    """Raise unless ``name`` is a registered policy that can choose decode instances.

    Raises:
        ConfigError: unknown name (:func:`unknown_policy`), or a policy that
            is not a routing policy (the message lists those).
    """
    if not can_choose_decode(name):
        raise ConfigError(
            f"decode policy {name!r} cannot choose decode instances; "
            f"routing policies: {', '.join(routing_names())}"
        )


def create_pd(
    prefill: str,
    decode: str,
    *,
    prefill_params: Mapping[str, Any] | None = None,
    decode_params: Mapping[str, Any] | None = None,
    decode_choice: str = "handoff",
) -> Policy:
    """A prefill/decode pair: ``prefill`` places arrivals, ``decode`` picks decode instances.

    The prefill side may be any policy; the decode side must be able to
    choose decode instances (:func:`can_choose_decode`). ``decode_choice``
    says when it chooses: at hand-off (``"handoff"``, vLLM's flow) or at
    dispatch (``"dispatch"``, SGLang's PD router, which sends each request
    to both servers at once); see :mod:`scheduler.policies.pd`.

    Raises:
        ConfigError: unknown name, bad parameters, or a decode policy that
            is not a routing policy (see :func:`check_decode_policy`).
    """
    from scheduler.policies.pd import PDPolicy  # loads the built-in policies

    check_decode_policy(decode)
    pre = create(prefill, **dict(prefill_params or {}))
    dec = create(decode, **dict(decode_params or {}))
    return PDPolicy(pre, dec, decode_choice=decode_choice)  # type: ignore[arg-type]


def names() -> tuple[str, ...]:
    """Registered policy names, sorted."""
    _load_builtins()
    return tuple(sorted(_REGISTRY))


# -- documentation --------------------------------------------------------------------


def describe(name: str | None = None) -> list[ParamInfo]:
    """Every parameter of the policy ``name`` (of every policy when None), in declaration order."""
    rows: list[ParamInfo] = []
    for n in names() if name is None else (name,):
        cls = policy_class(n)
        if cls.config_class is not None:
            rows += config_params(n, cls.config_class)
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
    for n in names():
        cls = policy_class(n)
        kind = " (*routing*)" if can_choose_decode(n) else ""
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
