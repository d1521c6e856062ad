"""`sftdoctor probes`: list every check with its id, level and one line (--json for tools)."""
from __future__ import annotations

from ..probes import REGISTRY

SCHEMA = "sftdoctor.probes/1"


def add_parser(sub) -> None:
    p = sub.add_parser("probes", help="list every check: id, level, what it finds",
                       description="List every check sftdoctor runs: its finding id (the public contract), its level "
                                   "(batch, step, run, checkpoint, dataset) and what it finds. Takes --json PATH; "
                                   "--html and --ignore do not apply to a list of checks.")
    p.add_argument("--level", choices=["batch", "step", "run", "checkpoint", "dataset"], help="only this level")
    p.add_argument("--json", metavar="PATH", help=f"also write the list as JSON (schema {SCHEMA}) here")
    p.set_defaults(func=run)


def rows(level: str | None = None) -> list[dict]:
    out = []
    for p in REGISTRY.probes:
        if level and p.level != level:
            continue
        for i in p.ids:
            out.append({"id": i, "level": p.level, "summary": p.summary if i == p.id else None,
                        "probe": p.id})
    return out


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    listed = rows(args.level)
    if args.json:
        import json

        from ..atomic import write_atomic

        write_atomic(args.json, json.dumps({"schema": SCHEMA, "probes": listed}, indent=1) + "\n")
    t = Table(title="sftdoctor checks", title_justify="left")
    t.add_column("id", style="bold")
    t.add_column("level")
    t.add_column("what it finds")
    for r in listed:
        # Text(): summaries hold brackets like labels[t+k] that rich would read as markup
        t.add_row(Text(r["id"]), Text(r["level"]), Text(r["summary"] or f"(from {r['probe']})"))
    Console().print(t)
    if args.json:
        print(f"list: {args.json}")
    return 0
