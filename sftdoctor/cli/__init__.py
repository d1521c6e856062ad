"""The command line: one module per verb, each with `add_parser(sub)` and `run(args) -> int`.

Exit codes for every verb: 0 no fail finding, 1 at least one fail finding, 2 bad input or
usage (one line on stderr, no traceback of ours).
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

from ..errors import UserError
from ..textsafe import terminal_safe

VERBS = ["inspect_batch", "probes_cmd", "report_cmd", "watch", "train", "diagnose"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"sftdoctor: error: {terminal_safe(message)}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sftdoctor", description="Find out why a supervised fine-tune went wrong.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"sftdoctor {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for name in VERBS:
        try:
            mod = import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # verb not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for "run this next" hints
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from .common import check_output_paths

        check_output_paths(args)
        return int(args.func(args) or 0)
    except UserError as e:
        # one line, inert: the message can quote a path or dataset text (escape sequences, newlines)
        print(f"sftdoctor: error: {terminal_safe(e).replace(chr(10), ' ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: 130; SIGTERM/SIGHUP (sftdoctor.signals): 128 + the signal
        print(f"sftdoctor: {getattr(e, 'signal_name', 'interrupted')}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))


def entry() -> None:  # console script
    raise SystemExit(main())
