"""`sftdoctor probes`: list every check with its id, level and one line."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("probes", help="list every check: id, level, what it finds")
    p.add_argument("--level", choices=["batch", "step", "run", "checkpoint", "dataset"], help="only this level")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from sftdoctor.probes import ALL

    t = Table(title="sftdoctor checks", title_justify="left")
    t.add_column("id", style="bold")
    t.add_column("level")
    t.add_column("what it finds")
    for p in ALL:
        if args.level and p.level != args.level:
            continue
        for i in p.ids:
            # Text(): summaries hold brackets like labels[t+k] that rich would read as markup
            t.add_row(Text(i), Text(p.level), Text(p.summary if i == p.id else f"(from {p.id})"))
    Console().print(t)
    return 0
