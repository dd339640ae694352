"""Helpers shared by the CLI commands: error reporting and KEY=VALUE options."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console

from traces.errors import LlmschedError

__all__ = ["console", "errors_to_exit", "parse_key_values", "show_warning"]

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
            _stderr.print(f"[red]error:[/red] {where}: {err['msg']}", highlight=False)
        raise typer.Exit(2) from None
    except (LlmschedError, FileNotFoundError) as exc:
        _stderr.print(f"[red]error:[/red] {exc}", highlight=False)
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


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a Python warning as one ``warning:`` line (replaces ``warnings.showwarning``)."""
    _stderr.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
