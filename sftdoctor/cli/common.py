"""Options and output shared by every verb: --json, --html, --ignore, and the exit code."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError

from ..report import Report


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="PATH", help="write the JSON report (schema sftdoctor.report/1) here")
    g.add_argument("--html", metavar="PATH", help="write a self-contained HTML report here")
    g.add_argument("--ignore", metavar="ID", action="append", default=[],
                   help="finding id to ignore (repeatable; also [tool.sftdoctor] ignore in pyproject.toml)")
    g.add_argument("--quiet", "-q", action="store_true", help="print only the verdict and findings, no token view")


def check_output_paths(args: argparse.Namespace) -> None:
    """Before any work: --json/--html may replace an earlier sftdoctor report, never another file
    of the user's (a typo like --json train.py must not cost them their script)."""
    for flag in ("json", "html"):
        path = getattr(args, flag, None)
        if not path or not os.path.exists(path):
            continue
        if os.path.isdir(path):
            raise UserError(f"--{flag} {path} is a folder; give a file path such as {os.path.join(path, 'report.' + flag)}")
        with open(path, "rb") as f:
            head = f.read(4096)
        if b"sftdoctor" not in head:
            raise UserError(f"--{flag} {path} exists and is not an sftdoctor report; choose another path or remove it first")


def write_outputs(report: Report, args: argparse.Namespace) -> None:
    if getattr(args, "json", None):
        report.save(args.json)
    if getattr(args, "html", None):
        from sftdoctor.reports.html import write_html

        write_html(report, args.html)


def print_report(report: Report, args: argparse.Namespace) -> None:
    from rich.console import Console

    from sftdoctor.reports.console import render

    render(report, Console(stderr=False, soft_wrap=False), tokens=not getattr(args, "quiet", False))


def finish(report: Report, args: argparse.Namespace, *, show: bool = True) -> int:
    """Write --json/--html, print, and return the exit code (0 pass/warn, 1 fail, 3 inconclusive:
    sftdoctor.verdict).

    Files are written before printing, so a closed stdout (`| head`) never loses the report."""
    write_outputs(report, args)
    if show:
        try:
            print_report(report, args)
            sys.stdout.flush()
        except BrokenPipeError:
            pass
    from ..verdict import exit_code

    return exit_code(report.verdict)
