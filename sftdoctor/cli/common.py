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


DEFAULT_REPORT = "sftdoctor-report.json"  # like coverage's .coverage: a known file in the current folder


def is_report_file(path: str) -> bool:
    """An sftdoctor JSON report, recognised by its `schema` field (not by a word in the file)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("sftdoctor.report/")


def use_default_report(args: argparse.Namespace) -> None:
    """With no --json, the report goes to ./sftdoctor-report.json, decided before any work: an
    earlier sftdoctor report there is replaced, any other file is left alone (and we say so)."""
    if getattr(args, "json", None):
        return
    path = os.path.abspath(DEFAULT_REPORT)
    if os.path.lexists(path) and not (os.path.isfile(path) and is_report_file(path)):
        print(f"sftdoctor: note: {DEFAULT_REPORT} exists and is not an sftdoctor report; leaving it alone, "
              f"so no JSON report is written (pass --json PATH to write one)", file=sys.stderr)
        return
    if not os.access(os.path.dirname(path), os.W_OK):
        print(f"sftdoctor: note: cannot write {DEFAULT_REPORT} in this folder; pass --json PATH to keep the report", file=sys.stderr)
        return
    args.json = path
    args.json_shown = DEFAULT_REPORT


def say_where(args: argparse.Namespace) -> None:
    """One line per file written, after the console report."""
    written = [(getattr(args, "json_shown", None) or args.json, "json")] if getattr(args, "json", None) else []
    if getattr(args, "html", None):
        written.append((args.html, "html"))
    for path, kind in written:
        hint = f"  (re-render: sftdoctor report {path} --html report.html)" if kind == "json" else ""
        print(f"report: {path}{hint}")


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
    """Write --json/--html, print, and return the exit code (0 pass/warn, 1 fail).

    Files are written before printing, so a closed stdout (`| head`) never loses the report."""
    write_outputs(report, args)
    if show:
        try:
            print_report(report, args)
            say_where(args)
            sys.stdout.flush()
        except BrokenPipeError:
            pass
    return 1 if report.verdict == "fail" else 0
