"""Renderers: console (rich), JSON and HTML all read the same Report object, and nothing else.

Installed as `sftdoctor.reports`. A file renderer is a flag (`--json`, `--html`) and a function
Report -> text; the CLI writes every renderer the user asked for by iterating FILE_RENDERERS,
so a new format is one entry here (and its module). The console renderer prints to a terminal:
sftdoctor.reports.console.render(report, console).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from sftdoctor.report import Report


@dataclass(frozen=True)
class FileRenderer:
    flag: str  # the CLI option that names the output file (--json PATH); '-' is standard output
    description: str
    render: Callable[["Report"], str]


def _json(report: "Report") -> str:
    return report.to_json() + "\n"  # the source of truth: every other renderer can be rebuilt from it


def _html(report: "Report") -> str:
    from .html import render_html  # jinja2 and matplotlib load only when a page is asked for

    return render_html(report)


FILE_RENDERERS = (
    FileRenderer("json", "write the JSON report (schema sftdoctor.report/1) here ('-': stdout)", _json),
    FileRenderer("html", "write a self-contained HTML report here ('-': stdout)", _html),
)
