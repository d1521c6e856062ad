"""Options and output shared by every verb: --json, --html, --ignore, and the exit code.

Output paths are checked before any work (check_output_paths): a long run must not end without
its report, and a report must never replace a file of the user's.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from ..atomic import write_atomic
from ..errors import UserError
from ..paths import check_writable_folder, describe_kind, is_regular, is_report_file, same_file
from ..probes import REGISTRY
from ..report import Report
from ..reports import FILE_RENDERERS
from ..session import Session
from ..verdict import exit_code

STDOUT = "-"
OUTPUT_FLAGS = tuple(r.flag for r in FILE_RENDERERS)
# argparse dests of every verb's input files: an output may never be one of them
INPUT_ARGS = ("report_json", "batch", "script", "config", "prompts", "data")


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    for r in FILE_RENDERERS:
        g.add_argument(f"--{r.flag}", metavar="PATH", help=r.description)
    g.add_argument("--ignore", metavar="ID", action="append", default=[],
                   help="finding id to ignore (repeatable; also [tool.sftdoctor] ignore in pyproject.toml)")
    g.add_argument("--quiet", "-q", action="store_true", help="print only the verdict and findings, no token view")


def _outputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [(flag, getattr(args, flag)) for flag in OUTPUT_FLAGS if getattr(args, flag, None)]


def check_output_paths(args: argparse.Namespace) -> None:
    """Before any work. --json/--html may replace an earlier sftdoctor report (recognised by its
    content: the JSON `schema` field, the HTML marker meta tag), never another file of the user's,
    never an input of this command, and never each other; their folder must exist and be
    writable. Only regular files are ever opened: a FIFO or a device would block the read."""
    outputs = _outputs(args)
    if len(outputs) == 2 and (outputs[0][1] == outputs[1][1] or same_file(outputs[0][1], outputs[1][1])):
        raise UserError(f"--json and --html both name {outputs[0][1]}; give them different paths")
    inputs = [(name, getattr(args, name)) for name in INPUT_ARGS if isinstance(getattr(args, name, None), str)]
    for flag, path in outputs:
        if path == STDOUT:
            continue
        for name, value in inputs:
            if same_file(path, value):
                raise UserError(f"--{flag} {path} is also this command's input ({name.replace('_', ' ')}); "
                                "writing the report there would replace it: choose another path")
        if os.path.lexists(path):
            if os.path.isdir(path):
                raise UserError(f"--{flag} {path} is a folder; give a file path such as {os.path.join(path, 'report.' + flag)}")
            if not is_regular(path):
                raise UserError(f"--{flag} {path} is {describe_kind(path)}, not a regular file; "
                                f"write to a file, or pass --{flag} - for standard output")
            if not is_report_file(path):
                raise UserError(f"--{flag} {path} exists and is not an sftdoctor report; choose another path or remove it first")
        check_writable_folder(os.path.dirname(path) or ".", f"--{flag} {path}")
    output_dir = getattr(args, "output_dir", None)
    if isinstance(output_dir, str) and output_dir:
        from ..train.rundir import check_output_dir

        check_output_dir(output_dir)


DEFAULT_REPORT = "sftdoctor-report.json"  # like coverage's .coverage: a known file in the current folder


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


def write_outputs(report: Report, args: argparse.Namespace) -> list[tuple[str, str, OSError]]:
    """Write every file renderer asked for (--json, --html); returns the writes that failed
    (flag, path, error), e.g. a full disk."""
    failed = []
    renderers = {r.flag: r for r in FILE_RENDERERS}
    for flag, path in _outputs(args):
        try:
            text = renderers[flag].render(report)
            if path == STDOUT:
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                write_atomic(path, text)  # a reader never sees half a report
        except OSError as e:
            if isinstance(e, BrokenPipeError) and path == STDOUT:
                continue
            failed.append((flag, path, e))
    return failed


def print_report(report: Report, args: argparse.Namespace) -> None:
    from rich.console import Console

    from sftdoctor.reports.console import render

    # a report written to stdout (--json -) keeps stdout for itself: the console report goes to stderr
    to_stderr = any(path == STDOUT for _, path in _outputs(args))
    render(report, Console(stderr=to_stderr, soft_wrap=False), tokens=not getattr(args, "quiet", False))


def write_failure(report: Report, failed: list[tuple[str, str, OSError]]) -> UserError:
    """After a late write failure (disk full, read-only file system): a fallback copy of the report
    in the temporary folder, and the one line that says what happened and where the copy is."""
    from ..atomic import write_fallback

    flag, path, e = failed[0]
    why = os.strerror(e.errno) if e.errno else str(e)
    copy = write_fallback(report.to_json() + "\n", ".json")
    hint = " (free some space)" if e.errno == errno.ENOSPC else ""
    where = f"a copy of the JSON report is at {copy}" if copy else "no fallback copy could be written either"
    return UserError(f"could not write --{flag} {path}: {why}{hint}; the report was printed above and {where}")


def finish(report: Report, args: argparse.Namespace, *, show: bool = True) -> int:
    """Write --json/--html, print, and return the exit code (0 pass/warn, 1 fail, 3 inconclusive:
    sftdoctor.verdict).

    Files are written before printing, so a closed stdout (`| head`) never loses the report. A
    write that fails (ENOSPC, EROFS) still prints the report, then raises one line (exit 2)."""
    # the root causes as the findings stand now: a part merged after its Session finished, an older
    # JSON file without them, or findings dropped by `report --ignore`
    Session.reopen(report, REGISTRY).finish()
    failed = write_outputs(report, args)
    if show or failed:
        try:
            print_report(report, args)
            say_where(args)
            sys.stdout.flush()
        except BrokenPipeError:
            pass
    if failed:
        raise write_failure(report, failed)
    return exit_code(report.verdict)
