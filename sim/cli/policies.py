"""``llmsched policies``: the policies, one line each; one policy in full; or every detail.

Examples::

    llmsched policies                        # one line per policy: what it does, its parameters
    llmsched policies laps                   # one policy: parameters, defaults, units, sources
    llmsched policies --all                  # every policy in full (paged on a terminal)
    llmsched policies --markdown > docs/policies.md
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Annotated

import typer

from sim.cli._common import console, errors_to_exit

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table

__all__ = ["policies"]


def policies(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[NAME]...", help="Policies to show in full (default: all, briefly)."
        ),
    ] = None,
    full: Annotated[
        bool, typer.Option("--all", help="Every policy with every parameter (paged on a terminal).")
    ] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print docs/policies.md instead of a table.")
    ] = False,
) -> None:
    """List the policies: one line each, or NAME's parameters, defaults, units and sources."""
    from scheduler.registry import names as registered
    from scheduler.registry import policy_class, policy_docs_markdown

    if markdown:
        typer.echo(policy_docs_markdown(), nl=False)
        return
    with errors_to_exit():
        for name in names or ():
            policy_class(name)  # an unknown name lists the known ones
    if names:
        console.print(_detail(list(names)))
        return
    if full:
        with console.pager(styles=True) if console.is_terminal else nullcontext():
            console.print(_detail(list(registered())))
        return
    console.print(_brief())
    console.print(
        "A policy in full (parameters, defaults, units, sources): llmsched policies NAME; "
        "all of them: --all; as Markdown: docs/policies.md. Prefill/decode: any policy for "
        "prefill, any routing policy for decode (--decode-policy)."
    )


def _brief() -> Table:
    """One row per policy: name, kind, what it does, its parameters' names."""
    from rich.table import Table

    from scheduler.registry import can_choose_decode, describe, names, policy_class, policy_summary

    table = Table(title="Policies (--policy NAME --policy-param KEY=VALUE)")
    table.add_column("policy", no_wrap=True, style="bold")
    table.add_column("kind", no_wrap=True)
    table.add_column("what it does", ratio=3)
    table.add_column("parameters", ratio=1)
    params: dict[str, list[str]] = {}
    for row in describe():
        params.setdefault(row.policy, []).append(row.param)
    for name in names():
        kind = "routing" if can_choose_decode(name) else "holds"
        summary = policy_summary(policy_class(name))
        table.add_row(name, kind, summary, ", ".join(params.get(name, [])) or "-")
    table.caption = "routing: places each arrival at once (also a decode policy); holds: may queue"
    return table


def _detail(selected: list[str]) -> Group:
    """Each selected policy: its description and source, then its parameters in a table."""
    import inspect

    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from scheduler.registry import can_choose_decode, describe, policy_class

    parts: list[object] = []
    for name in selected:
        cls = policy_class(name)
        kind = "routing: places each arrival at once" if can_choose_decode(name) else "may hold"
        doc = " ".join((inspect.getdoc(cls) or "").replace("``", "").split())
        parts.append(Text.from_markup(f"\n[bold]{escape(name)}[/bold] ({kind})"))
        parts.append(Text(doc))
        parts.append(Text(f"Source: {cls.source}", style="dim"))
        rows = describe(name)
        if not rows:
            parts.append(Text("No parameters."))
            continue
        table = Table(show_lines=True)
        table.add_column("parameter", no_wrap=True)
        for col in ("type", "default", "unit"):
            table.add_column(col, overflow="fold")
        table.add_column("meaning", ratio=3)
        table.add_column("source", ratio=2)
        for r in rows:
            table.add_row(r.param, r.type, repr(r.default), r.unit, r.help, r.source)
        parts.append(table)
    return Group(*parts)
