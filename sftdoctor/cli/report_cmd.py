"""`sftdoctor report run.json [--html out.html]`: re-render a saved JSON report, no rerun."""
from __future__ import annotations

from ..report import Report
from .common import add_output_options, finish


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="re-render a saved JSON report (console, --html, --json)",
                       description="Re-render a saved JSON report without rerunning anything: on the console, as HTML "
                                   "(--html), or as JSON again (--json, e.g. with --ignore applied).")
    p.add_argument("report_json", metavar="RUN.json")
    add_output_options(p)  # --json, --html, --ignore, --quiet as in every other verb
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import ignored_ids
    from ..findings import CheckResult

    report = Report.load(args.report_json)
    ignore = ignored_ids(args.ignore)
    if ignore:  # as if the run had ignored them: the finding goes, its check reads "skipped"
        report.findings = [f for f in report.findings if f.id not in ignore]
        known = {c.id for c in report.checks}
        for c in report.checks:
            if c.id in ignore:
                c.status, c.reason = "skipped", "ignored by configuration"
        report.checks += [CheckResult(i, "skipped", "ignored by configuration", None) for i in sorted(ignore - known)]
    return finish(report, args)
