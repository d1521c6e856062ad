"""`sftdoctor report run.json [--html out.html]`: re-render a saved JSON report, no rerun."""
from __future__ import annotations

from ..report import Report
from .common import finish


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="re-render a saved JSON report (console, --html)")
    p.add_argument("report_json", metavar="RUN.json")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report here")
    p.add_argument("--quiet", "-q", action="store_true", help="no token view")
    p.set_defaults(func=run)


def run(args) -> int:
    report = Report.load(args.report_json)
    args.json = None  # never rewrite the input
    return finish(report, args)
