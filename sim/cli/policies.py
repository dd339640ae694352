"""``llmsched policies``: every policy with its parameters, defaults, units and sources.

Examples::

    llmsched policies                        # the table
    llmsched policies --markdown > docs/policies.md
"""

from __future__ import annotations

from typing import Annotated

import typer

from sim.cli._common import console

__all__ = ["policies"]


def policies(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print docs/policies.md instead of the table.")
    ] = False,
) -> None:
    """List every policy with its parameters, defaults, units and sources."""
    from rich.table import Table

    from scheduler.registry import (
        can_choose_decode,
        describe,
        names,
        policy_class,
        policy_docs_markdown,
        policy_summary,
    )

    if markdown:
        typer.echo(policy_docs_markdown(), nl=False)
        return
    table = Table(title="Policies (--policy NAME --policy-param KEY=VALUE)", show_lines=True)
    for col in ("policy", "parameter"):
        table.add_column(col, no_wrap=True)
    for col in ("type", "default", "unit", "meaning", "source"):
        table.add_column(col, overflow="fold")
    rows = describe()
    for name in names():
        cls = policy_class(name)
        kind = " (routing)" if can_choose_decode(name) else ""
        table.add_row(f"[bold]{name}[/bold]{kind}", "", "", "", "", policy_summary(cls), cls.source)
        for r in rows:
            if r.policy == name:
                table.add_row("", r.param, r.type, repr(r.default), r.unit, r.help, r.source)
    console.print(table)
    console.print(
        "Prefill/decode: any policy for prefill, any (routing) policy for decode "
        "(scheduler.registry.create_pd). Full text: docs/policies.md"
    )
