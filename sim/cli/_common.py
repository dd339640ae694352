"""Helpers shared by the CLI commands: error reporting, KEY=VALUE options, cluster flags.

Light on purpose: every command module imports this one, and ``llmsched
--help`` imports every command module, so nothing here may load a simulator,
a report or a data library. The cluster flags (engine limits and simulator
options) are made from their tables (:data:`sim.limits.LIMIT_OPTIONS`,
:data:`sim.specs.SIMULATION_OPTIONS`) by :func:`cluster_flags`, so a setting
added there is a flag of ``simulate`` and ``compare`` at once.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from traces.errors import ConfigError, LlmschedError

__all__ = [
    "BAND_HELP",
    "NO_CLUSTER_FLAGS",
    "BandCommand",
    "ClusterFlags",
    "LoadOptionOpt",
    "ProgressLines",
    "TraceFormatOpt",
    "TransformOpt",
    "check_out_folder",
    "cluster_flag_names",
    "cluster_flags",
    "console",
    "errors_to_exit",
    "parse_band",
    "parse_key_values",
    "show_warning",
    "trace_keys",
    "warn",
]

# Piped output (CI logs, `| less`) gets room for the wide tables instead of 80 columns.
_piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
console = Console(width=160 if _piped else None)
_stderr = Console(stderr=True)


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn the project's errors into a one-line message and exit status 2."""
    try:
        yield
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(value)"
            msg = escape(f"{where}: {err['msg']}")
            _stderr.print(f"[red]error:[/red] {msg}", highlight=False)
        raise typer.Exit(2) from None
    except (LlmschedError, FileNotFoundError) as exc:
        _stderr.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def parse_key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """Parse repeated ``KEY=VALUE`` flags; values are read as JSON when they parse."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=flag)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


# The trace flags of the commands that load a trace file (simulate, replay, fidelity, trace).
TraceFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format", help="Trace format, if not detected (llmsched trace stats lists them)."
    ),
]
LoadOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--load-option",
        metavar="KEY=VALUE",
        help="Loader option, repeatable (e.g. jitter=true for Mooncake's 3 s buckets).",
    ),
]
TransformOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--transform",
        metavar="KEY=VALUE",
        help="Trace transform, repeatable: window_s=[0,600], rate_rps=4, sample=0.5, "
        "max_requests=1000, max_prompt_tokens=8192, drop_failed=true, ...",
    ),
]


def trace_keys(
    source: dict[str, Any],
    fmt: str | None,
    load_option: list[str] | None,
    transform: list[str] | None,
) -> dict[str, Any]:
    """A run's ``trace`` table from its source keys and the trace flags above."""
    return {
        **source,
        "format": fmt,
        "options": parse_key_values(load_option, "--load-option"),
        "transforms": parse_key_values(transform, "--transform"),
    }


def check_out_folder(out: Path, flag: str = "--out") -> None:
    """Refuse an output path that exists and is not a folder, naming the flag."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: is a file; expected a folder (new or existing)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {out}: {parent} is a file; expected a folder")
            break


class ProgressLines:
    """Progress as plain lines, for output that is not a terminal (a CI log, a pipe).

    A progress bar draws nothing there, so a long run would print nothing for
    minutes. :meth:`update` prints ``WHAT DONE/TOTAL (PCT) after N s`` every
    ``every_s`` seconds (:attr:`EVERY_S` by default), and a last line when the
    count reaches ``total`` if any line came before it: a run shorter than
    that prints nothing.
    """

    #: Seconds between lines by default.
    EVERY_S = 10.0

    def __init__(
        self, what: str, total: int | None = None, *, every_s: float | None = None
    ) -> None:
        self.what, self.total = what, total
        self.every_s = self.EVERY_S if every_s is None else every_s
        self.done = 0
        self._start = self._last = time.monotonic()
        self._printed = False

    def advance(self, detail: str = "") -> None:
        """One more done."""
        self.update(self.done + 1, detail)

    def update(self, done: int, detail: str = "") -> None:
        """``done`` so far; print a line if one is due."""
        self.done = done
        now = time.monotonic()
        due = now - self._last >= self.every_s
        finished = self.total is not None and done >= self.total
        if not (due or (finished and self._printed)):
            return
        self._last, self._printed = now, True
        of = f"/{self.total:,} ({done / self.total:.0%})" if self.total else ""
        tail = f": {detail}" if detail else ""
        console.print(
            f"{self.what} {done:,}{of} after {now - self._start:,.0f} s{tail}",
            highlight=False,
            markup=False,
        )


def warn(message: str) -> None:
    """Print one ``warning:`` line on stderr (about the run, not about Python)."""
    _stderr.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a Python warning as one ``warning:`` line (replaces ``warnings.showwarning``)."""
    _stderr.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False)


# -- cluster flags ----------------------------------------------------------------------


class ClusterFlags(typing.NamedTuple):
    """The cluster flags a user gave (unset ones absent), as scenario keys."""

    #: ``[cluster.limits]`` keys (:data:`sim.limits.LIMIT_OPTIONS`).
    limits: dict[str, Any]
    #: ``[cluster]`` keys besides the limits: ``engine`` and the simulator options
    #: (:data:`sim.specs.SIMULATION_OPTIONS`).
    options: dict[str, Any]
    #: The flags as typed, for the command line a report shows.
    argv: list[str]


#: The placeholder default of a command's ``cluster`` parameter (never seen by the command).
NO_CLUSTER_FLAGS = ClusterFlags({}, {}, [])


def cluster_flag_names(prefix: str = "") -> dict[str, str]:
    """Key path -> flag for every cluster flag: ``limits.max_total_tokens`` -> ``--max-total-tokens``.

    ``prefix`` goes before each path (``"cluster."`` for the paths of a whole run).
    """
    from sim.limits import LIMIT_OPTIONS
    from sim.specs import SIMULATION_OPTIONS

    names = {f"{prefix}limits.{o.key}": o.cli_flag for o in LIMIT_OPTIONS}
    keys = (*_ENGINE_KEYS, *SIMULATION_OPTIONS)
    names.update({prefix + key: "--" + key.replace("_", "-") for key in keys})
    return names


#: ``[cluster]`` keys that choose the engine model (a flag each, beside the limits).
_ENGINE_KEYS = ("engine",)


def _limit_params() -> list[tuple[inspect.Parameter, str, str]]:
    from sim.limits import LIMIT_OPTIONS

    out = []
    for o in LIMIT_OPTIONS:
        if o.type is bool:
            tp: Any = Annotated[bool, typer.Option(o.cli_flag, help=o.help)]
            default: Any = False
        else:
            tp, default = Annotated[o.type | None, typer.Option(o.cli_flag, help=o.help)], None
        out.append((_param(o.key, tp, default), "limits", o.cli_flag))
    return out


def _option_params() -> list[tuple[inspect.Parameter, str, str]]:
    from sim.specs import SIMULATION_OPTIONS, ClusterSpec

    out = []
    for key in (*_ENGINE_KEYS, *SIMULATION_OPTIONS):
        field = ClusterSpec.model_fields[key]
        flag = "--" + key.replace("_", "-")
        text = " ".join((field.description or "").split()).replace("``", "")
        help = f"{text} Default: {field.default!r}."
        choices = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal:
            # An Enum is how typer offers choices; click's error then lists them.
            enum = Enum(key, {c: c for c in choices}, type=str)  # type: ignore[misc]
            tp: Any = Annotated[enum | None, typer.Option(flag, help=help)]
        else:
            # Bounds checked by click, so the error names the flag as typed.
            low = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), None)
            tp = Annotated[float | None, typer.Option(flag, help=help, min=low)]
        out.append((_param(key, tp, None), "options", flag))
    return out


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation
    )


def cluster_flags(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command one flag per engine limit and simulator option, and ``--engine``.

    ``func`` takes a parameter ``cluster: ClusterFlags``; in the command's
    signature it is replaced, in place, by the flags, and the wrapper hands
    ``func`` the ones the user set. A switch left off and a flag left out
    are both "not set", so a scenario's own value stands.
    """
    made = _limit_params() + _option_params()
    where = {p.name: (part, flag) for p, part, flag in made}
    sig = inspect.signature(func, eval_str=True)
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        params += [m for m, _, _ in made] if p.name == "cluster" else [p]

    reads_scenario = "scenario" in sig.parameters

    @functools.wraps(func)
    def command(*args: Any, **kwargs: Any) -> Any:
        got = ClusterFlags({}, {}, [])
        for name, (part, flag) in where.items():
            value = kwargs.pop(name, None)
            if value is None or value is False:
                continue
            if isinstance(value, Enum):
                value = value.value
            getattr(got, part)[name] = value
            got.argv.extend([flag] if value is True else [flag, str(value)])
        # The engine is the flag's, else the default unless a scenario may set it.
        engine = got.options.get("engine", None if reads_scenario else "sglang")
        if engine is not None:
            from sim.limits import check_engine_settings

            with errors_to_exit():
                check_engine_settings(engine, got.limits, flags=True)
        return func(*args, cluster=got, **kwargs)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer reads the signature above, not func's
    return command


# -- the band flag ----------------------------------------------------------------------

#: The help of ``--band`` (``simulate``, ``compare``).
BAND_HELP = (
    "Also simulate with every step cost scaled by 1-REL and 1+REL, and show each figure's "
    "range (--band 0.05: ±5%). --band alone: the calibration profile's fit error (rms)."
)

#: What ``--band`` given alone stands for.
_BAND_ALONE = "profile"


def _is_number_like(arg: str) -> bool:
    """Whether ``arg`` reads as a value for ``--band`` (``0.05``, ``.1``, ``5%``, ``-1``)."""
    body = arg.removeprefix("-").removeprefix("+")
    return body[:1].isdigit() or (body[:1] == "." and body[1:2].isdigit())


class BandCommand(TyperCommand):
    """A command whose ``--band`` may come without a value (then: the profile's fit error).

    Typer's parser has no optional values, so a ``--band`` not followed by a
    number is read as ``--band=profile`` before parsing.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        out: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                out += args[i:]
                break
            bare = arg == "--band" and not (i + 1 < len(args) and _is_number_like(args[i + 1]))
            out.append(f"--band={_BAND_ALONE}" if bare else arg)
        return super().parse_args(ctx, out)


def parse_band(text: str | None, profile: str | Path | None, *, profile_flag: str) -> float | None:
    """``--band``'s relative error: the number given, or alone the profile's fit error.

    ``profile_flag`` names where a profile would come from (``--profile``), for the
    message when there is none.

    Raises:
        ConfigError: a value that is not a relative error, ``--band`` alone without a
            profile, or a profile with no fit error; one line naming ``--band``.
    """
    from sim.band import check_band, profile_error

    if text is None:
        return None
    if text == _BAND_ALONE:
        if profile is None:
            raise ConfigError(
                f"--band alone takes the calibration profile's fit error, and there is no "
                f"profile ({profile_flag}); give the error as a number, e.g. --band 0.05 for ±5%"
            )
        return profile_error(profile)
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(
            f"--band: expected a relative error such as 0.05 (for ±5%), or no value for the "
            f"profile's fit error; got {text!r}"
        ) from None
    try:
        return check_band(value)
    except ValueError as exc:
        raise ConfigError(f"--band: {exc}") from None
