"""What ``llmsched router`` runs: backends, policy, limits and operations, as one checked model.

Flags and a config file (TOML or YAML, ``--config``) fill the same
:class:`RouterConfig`; flags given on the command line override the file's
keys. Every key is checked by pydantic and a bad one is reported as
``key.path: problem``, as scenario files are.

A backend is one serving instance (one SGLang or vLLM server)::

    [[backends]]
    url = "http://10.0.0.5:30000"
    protocol = "sglang"      # sglang | vllm | openai (any OpenAI-compatible server)
    role = "prefill"         # regular | prefill | decode
    bootstrap_port = 8998    # SGLang PD: the prefill server's bootstrap port
    api_key = "..."          # sent upstream as a bearer token; never logged
    pools = ["short"]        # extra pool names the policy may dispatch to

The policy sees backends in the order given, as instances ``0, 1, ...``;
role ``regular`` is the policy's ``mixed``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from scheduler.router.health import BreakerSettings, HealthSettings
from traces.configfile import read_table_file, validation_messages
from traces.errors import ConfigError

__all__ = [
    "BACKEND_ROLES",
    "PROTOCOLS",
    "BackendConfig",
    "RouterConfig",
    "check_backend_url",
    "load_config",
    "policy_role",
]

#: Wire protocols of a backend: SGLang's, vLLM's, or any OpenAI-compatible server.
PROTOCOLS: tuple[str, ...] = ("sglang", "vllm", "openai")
#: Backend roles: a whole-request server, or one side of a prefill/decode pair.
BACKEND_ROLES: tuple[str, ...] = ("regular", "prefill", "decode")


def policy_role(role: str) -> str:
    """The policy's name for a backend role (``regular`` is ``mixed``)."""
    return "mixed" if role == "regular" else role


def check_backend_url(url: str) -> str:
    """``url`` without a trailing slash, if it is ``http://`` or ``https://`` with a host.

    Raises:
        ValueError: anything else, naming what is wrong.
    """
    u = urlsplit(url)
    if "@" in u.netloc:
        # Not echoed: the URL holds a password. Requests would not send it, and
        # /workers and the logs would show it.
        raise ValueError("expected no user:password@ in a backend URL; give its api_key instead")
    if u.scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL; got {url!r}")
    if not u.hostname:
        raise ValueError(f"expected a host in the URL; got {url!r}")
    try:
        u.port  # noqa: B018 (parses the port, raising on a bad one)
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if u.query or u.fragment:
        raise ValueError(f"expected no query or fragment in a backend URL; got {url!r}")
    return url.rstrip("/")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(_Model):
    """One serving instance behind the router."""

    url: str
    """``http://host:port`` (or ``https://``) of the server."""
    protocol: Literal["sglang", "vllm", "openai"] = "vllm"
    """Its API: what its PD handshake and load gauges look like (``openai``: none of either)."""
    role: Literal["regular", "prefill", "decode"] = "regular"
    """Whole requests, or one side of a prefill/decode pair."""
    name: str | None = None
    """Shown in metrics, logs and records (default: the URL)."""
    api_key: SecretStr | None = None
    """Sent upstream as ``authorization: Bearer ...``; never logged or shown."""
    bootstrap_port: int | None = Field(None, ge=1, le=65535)
    """SGLang PD: the prefill server's ``--disaggregation-bootstrap-port`` (default 8998)."""
    pools: tuple[str, ...] = ()
    """Extra pool names this backend belongs to, beside the built-in ones."""
    kv_capacity_tokens: int | None = Field(None, ge=1)
    """KV-cache tokens the server holds, for the policy's view and prefix record
    (default: what its gauges say, else :data:`RouterConfig.default_kv_capacity_tokens`)."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_backend_url(v)

    @property
    def label(self) -> str:
        """The name in metrics, logs and records."""
        return self.name or self.url


class RouterConfig(_Model):
    """Everything ``llmsched router`` serves with; see the module docstring."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(8080, ge=0, le=65535)
    """Port to listen on (0: any free one)."""
    backends: tuple[BackendConfig, ...] = ()
    """The serving instances, in the order the policy numbers them."""
    policy: str = "fcfs"
    """The scheduling policy (``llmsched policies`` lists them)."""
    policy_params: dict[str, Any] = Field(default_factory=dict)
    """The policy's parameters."""
    decode_policy: str | None = None
    """Under PD: the routing policy choosing decode servers (default: the least loaded)."""
    decode_policy_params: dict[str, Any] = Field(default_factory=dict)
    """The decode policy's parameters."""
    decode_choice: Literal["handoff", "dispatch"] = "handoff"
    """When the decode policy chooses: when the prefill is done (vLLM's flow) or when the
    request is sent (SGLang's). SGLang's handshake needs the pair before it sends, so under
    ``handoff`` an SGLang pair's decode server is chosen just before sending."""
    model: str | None = None
    """The model name clients use (default: what the backends' ``/v1/models`` says)."""
    tokenizer: str | None = None
    """A local HF tokenizer (``tokenizer.json`` or its folder) to count prompts as the server does
    (default: the built-in one-token-per-word tokenizer, an estimate for real models)."""
    default_max_tokens: int = Field(1024, ge=1)
    """Output budget the policy assumes for a chat request that gives none (the servers' own
    default is the rest of the context window); completions assume 16 and ``/generate`` 128,
    the servers' defaults."""
    block_tokens: int = Field(16, ge=1)
    """Tokens per prefix block of the policy's prefix record."""
    default_kv_capacity_tokens: int = Field(262_144, ge=1)
    """KV capacity assumed for a backend that neither its config nor its gauges give."""
    poll_interval_s: float = Field(0.5, ge=0)
    """Seconds between polls of the backends' load gauges (0: never poll)."""
    health: HealthSettings = Field(default_factory=HealthSettings)
    """Active health checks."""
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    """The per-backend circuit breaker."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Seconds a connect to a backend may take."""
    read_timeout_s: float = Field(300.0, gt=0)
    """Seconds a backend may stay silent before the response's head or between stream chunks."""
    retries: int = Field(2, ge=0)
    """Other backends tried when one fails before anything reached the client."""
    retry_backoff_s: float = Field(0.02, ge=0)
    """Wait before the first retry, doubled for each further one."""
    max_queue: int = Field(4096, ge=1)
    """Requests the router holds undispatched at most; more are answered 429."""
    queue_timeout_s: float = Field(60.0, gt=0)
    """Seconds a request may wait in the router undispatched; then it is answered 408."""
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    """Largest request body accepted (413 beyond)."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Largest prompt accepted, as counted (400 beyond); default no limit."""
    admin_key: SecretStr | None = None
    """Bearer token of the admin API (``/workers``); without one the admin API is off."""
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    """Hosts (names, addresses or CIDR ranges) a backend added at run time may have."""
    allowed_schemes: tuple[str, ...] = ("http", "https")
    """Schemes a backend added at run time may have."""
    record: str | None = None
    """Folder to record arrivals (as a trace) and result records in."""
    shutdown_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM, seconds in-flight requests get to finish."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the JSON logs."""
    access_log: bool = False
    """Log every request (one JSON line each)."""

    @field_validator("admin_key")
    @classmethod
    def _admin_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 12:
            raise ValueError(
                "expected at least 12 characters (an empty or short key would leave the admin "
                "API open to guessing); leave it unset to turn the admin API off"
            )
        return v

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        urls = [b.url for b in v]
        dup = sorted({u for u in urls if urls.count(u) > 1})
        if dup:
            raise ValueError(f"backend URLs must differ; repeated: {', '.join(dup)}")
        roles = {b.role for b in v}
        if ("prefill" in roles) != ("decode" in roles):
            raise ValueError("PD needs at least one prefill and one decode backend")
        if "regular" in roles and "prefill" in roles:
            raise ValueError("regular backends cannot be mixed with prefill/decode ones")
        return v

    @property
    def pd(self) -> bool:
        """Whether the backends are prefill/decode pairs."""
        return any(b.role == "prefill" for b in self.backends)

    def host_allowed(self, url: str) -> bool:
        """Whether a backend at ``url`` may be added at run time."""
        u = urlsplit(url)
        if u.scheme not in self.allowed_schemes or not u.hostname:
            return False
        host = u.hostname
        for allowed in self.allowed_hosts:
            if allowed == "*" or allowed == host:
                return True
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(allowed, strict=False):
                    return True
            except ValueError:
                continue
        return False


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RouterConfig:
    """The config of a file (or none), with ``overrides`` (from flags) replacing its keys.

    Raises:
        ConfigError: an unreadable file or an invalid key; the message names
            the file (or ``options``) and each key path with its problem.
    """
    data: dict[str, Any] = read_table_file(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if key == "policy_params" and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    source = str(path) if path is not None else "options"
    try:
        cfg = RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"{source}: " + "\n  ".join(validation_messages(exc, RouterConfig))
        ) from None
    if not cfg.backends:
        raise ConfigError(
            f"{source}: no backends; give --backend URL (or [[backends]] in --config)"
        )
    return cfg
