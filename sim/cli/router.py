"""``llmsched router``: the policies live, as a reverse proxy in front of SGLang or vLLM servers.

Examples::

    llmsched router --port 8080 --policy laps \\
        --backend http://10.0.0.5:8000 --backend http://10.0.0.6:8000 --protocol vllm
    llmsched router --port 8080 --protocol sglang --policy fcfs \\
        --prefill http://10.0.0.5:30000 --bootstrap-port 8998 --decode http://10.0.0.6:30000
    llmsched router --config router.toml --record runs/live

Clients talk to it as to the servers (``/v1/completions``,
``/v1/chat/completions``, SGLang's ``/generate``); the same policy objects
the simulator runs decide where and when each request goes. A flag given
replaces the config file's key. Upstream API keys and the admin key may
come from the environment (``LLMSCHED_BACKEND_API_KEY``,
``LLMSCHED_ADMIN_KEY``) so they stay out of process listings.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from sim.cli._common import errors_to_exit, parse_key_values

__all__ = ["router"]


class _Protocol(StrEnum):
    sglang = "sglang"
    vllm = "vllm"
    openai = "openai"


def router(
    backend: Annotated[
        list[str] | None,
        typer.Option(help="URL of a backend serving whole requests; repeatable."),
    ] = None,
    prefill: Annotated[
        list[str] | None,
        typer.Option(help="URL of a PD prefill server; repeatable (pair with --decode)."),
    ] = None,
    decode: Annotated[
        list[str] | None, typer.Option(help="URL of a PD decode server; repeatable.")
    ] = None,
    bootstrap_port: Annotated[
        list[int] | None,
        typer.Option(help="SGLang PD: bootstrap port of each --prefill, in order (default 8998)."),
    ] = None,
    protocol: Annotated[
        _Protocol | None,
        typer.Option(help="Protocol of the backends given by flags (default vllm)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML or YAML config file (see the README).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 8080).")] = None,
    policy: Annotated[
        str | None, typer.Option(help="Scheduling policy (llmsched policies; default fcfs).")
    ] = None,
    policy_param: Annotated[
        list[str] | None,
        typer.Option("--policy-param", metavar="KEY=VALUE", help="Policy parameter, repeatable."),
    ] = None,
    decode_policy: Annotated[
        str | None, typer.Option(help="Routing policy choosing decode servers (PD).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model name clients must use (default: any).")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="The served model's HF tokenizer (tokenizer.json or its folder) to count "
            "prompts exactly (default: an estimate, one token per word)."
        ),
    ] = None,
    poll_interval_ms: Annotated[
        float | None,
        typer.Option(help="Polls of the backends' load gauges, ms apart (0: none; default 500)."),
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Requests held undispatched at most (then 429).")
    ] = None,
    record: Annotated[
        Path | None,
        typer.Option(help="Record arrivals (as a trace) and result records in this folder."),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(envvar="LLMSCHED_ADMIN_KEY", help="Bearer token of the admin API (/workers)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LLMSCHED_BACKEND_API_KEY",
            help="API key sent to the backends given by flags.",
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    access_log: Annotated[
        bool | None, typer.Option("--access-log/--no-access-log", help="Log every request.")
    ] = None,
) -> None:
    """Route requests to SGLang or vLLM servers with a scheduling policy, live."""
    with errors_to_exit():
        from scheduler.router.config import load_config
        from scheduler.router.server import run

        overrides: dict[str, Any] = {}
        flagged = _backends(backend, prefill, decode, bootstrap_port, protocol, api_key)
        if flagged:
            overrides["backends"] = flagged
        for key, value in (
            ("host", host),
            ("port", port),
            ("policy", policy),
            ("decode_policy", decode_policy),
            ("model", model),
            ("tokenizer", None if tokenizer is None else str(tokenizer)),
            ("poll_interval_s", None if poll_interval_ms is None else poll_interval_ms / 1e3),
            ("max_queue", max_queue),
            ("record", None if record is None else str(record)),
            ("admin_key", admin_key),
            ("log_level", log_level),
            ("access_log", access_log),
        ):
            if value is not None:
                overrides[key] = value
        params = parse_key_values(policy_param, "--policy-param")
        if params:
            overrides["policy_params"] = params
        cfg = load_config(config, overrides)
        run(cfg)


def _backends(
    backend: list[str] | None,
    prefill: list[str] | None,
    decode: list[str] | None,
    bootstrap: list[int] | None,
    protocol: _Protocol | None,
    api_key: str | None,
) -> list[dict[str, Any]]:
    from traces.errors import ConfigError

    proto = (protocol or _Protocol.vllm).value
    common: dict[str, Any] = {"protocol": proto}
    if api_key:
        common["api_key"] = api_key
    if bool(prefill) != bool(decode):
        raise ConfigError("--prefill and --decode go together (PD needs both)")
    if backend and prefill:
        raise ConfigError("--backend cannot be mixed with --prefill/--decode")
    if bootstrap and len(bootstrap) > len(prefill or []):
        raise ConfigError(
            f"--bootstrap-port: {len(bootstrap)} given for {len(prefill or [])} --prefill servers"
        )
    out = [{"url": u, **common} for u in backend or []]
    for k, u in enumerate(prefill or []):
        entry = {"url": u, "role": "prefill", **common}
        if bootstrap and k < len(bootstrap):
            entry["bootstrap_port"] = bootstrap[k]
        out.append(entry)
    out.extend({"url": u, "role": "decode", **common} for u in decode or [])
    return out
