"""`sftdoctor watch [options] train.py [args...]`: run your training script unchanged with every
probe attached; report what went wrong, however the script ends."""
from __future__ import annotations

import argparse

from .common import add_output_options, finish, use_default_report

EPILOG = """examples:
  sftdoctor watch train.py --lr 1e-5               your script, its own arguments after it
  sftdoctor watch --fail-fast --json run.json train.py
  sftdoctor watch --max-steps 20 -m mypkg.train
  torchrun --nproc_per_node 2 -m sftdoctor watch train.py   one merged report (rank 0 writes it)

the JSON report goes to --json PATH, else to ./sftdoctor-report.json (an earlier sftdoctor report
there is replaced; any other file of that name is left alone); `sftdoctor report
sftdoctor-report.json --html out.html` renders it again.

exit code: the script's own when it failed (exception 1, sys.exit(n) n, Ctrl-C 130, SIGTERM 143),
else 1 when a fail finding was found, 3 when nothing could be checked (inconclusive), else 0.
Several ranks: rank 0 exits with the first failing rank's code (docs/distributed.md)."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "watch",
        help="run your training script with sftdoctor attached (batch, step, checkpoint probes)",
        description="Run a training script unchanged, with sftdoctor's probes attached to the model it trains.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("script", nargs="?", help="your training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a module as the script (like python -m)")
    p.add_argument("--fail-fast", action="store_true", help="stop the script at the first fail finding")
    p.add_argument("--max-steps", type=int, metavar="N", help="watch the first N optimizer steps, then stop the script")
    p.add_argument("--every", type=int, default=50, metavar="N",
                   help="run the full step probes every N optimizer steps (default 50; cheap checks run on every step)")
    p.add_argument("--full-steps", type=int, default=3, metavar="N", help="full step probes on the first N steps (default 3)")
    p.add_argument("--max-length", type=int, metavar="N", help="the max_length your rows were truncated to")
    p.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import ignored_ids
    from ..errors import UserError
    from ..live import LiveView
    from ..watch import Watcher, WatchOptions, exit_code
    from .. import distributed
    from ..signals import terminate_as_interrupt

    script, script_args = args.script, list(args.script_args)
    if args.module and script:  # `-m pkg a b`: argparse took `a` for the script
        script, script_args = None, [script, *script_args]
    if not script and not args.module:
        raise UserError("nothing to watch: sftdoctor watch train.py [script args...] (or -m module)")
    for name in ("max_steps", "every", "full_steps"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "max_steps" else 0):
            raise UserError(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'max_steps' else '>= 0'}, got {value}")
    use_default_report(args)  # before the script runs: where the report goes is settled up front
    options = WatchOptions(every=args.every, full_steps=args.full_steps, fail_fast=args.fail_fast,
                           max_steps=args.max_steps, ignore=frozenset(ignored_ids(args.ignore)),
                           max_length=args.max_length)
    job = distributed.Job.start()  # None: one process
    view = LiveView(plain=True if args.plain else None, quiet=False, rank=job.rank if job else None)
    watcher = Watcher(options, view, job=job)
    if job is None:
        with terminate_as_interrupt():  # SIGTERM/SIGHUP end the script like Ctrl-C: the report is still written
            local = watcher.run(script, script_args, module=args.module)
        finish(local, args)
        return exit_code(local)
    # SIGTERM stops the script; afterwards it is only noted, up to this process's exit (torchrun
    # SIGTERMs the survivors once a rank exits non-zero: the report must still be written)
    job.install_signals(lambda: watcher.in_script)
    local = watcher.run(script, script_args, module=args.module)
    report = job.collect(local)  # never a collective: a peer may be dead or stuck
    if report is None:
        # not rank 0: rank 0 prints and writes the merged report (its exit code carries the
        # findings); wait until it has, so this rank's exit does not get it killed mid-write
        job.linger()
        return exit_code(local) if distributed.is_failure(local.run) else 0
    try:
        finish(report, args)
    finally:
        job.written()
    return exit_code(report)
