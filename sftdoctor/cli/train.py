"""`sftdoctor train`: fine-tune with a known-good recipe; refuse a run the probes know is
broken, and with --fix repair what has a remedy.

    sftdoctor train --fix                       # tiny model, synthetic problems, CPU, minutes
    sftdoctor train --model Qwen/Qwen2.5-0.5B --data openai/gsm8k --learning-rate 1e-5 --epochs 3
    torchrun --nproc_per_node 2 -m sftdoctor train ...   # the same command, data parallel
"""
from __future__ import annotations

import argparse

from .common import add_output_options, finish


def add_parser(sub) -> None:
    from ..train.recipe import add_recipe_arguments

    p = sub.add_parser(
        "train",
        help="fine-tune with a known-good recipe, gated by the probes (--fix repairs what it can)",
        description="Supervised fine-tuning on HF Trainer. Preflight runs the probes on the first real batches; "
                    "a fail finding stops the run unless --fix, which applies each known remedy and says what it changed.",
    )
    p.add_argument("--fix", action="store_true", help="apply the remedy of each preflight finding that has one, print each change, and train")
    p.add_argument("--config", metavar="FILE", help="recipe fields from a .yaml or .toml file (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir (no example repeated or skipped)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints, model and report of a non-empty --output-dir")
    p.add_argument("--dry-run", action="store_true", help="stop after preflight (and --fix): check the pipeline without training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the --model folder's own Python code (off by default)")
    add_recipe_arguments(p)
    add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import ignored_ids
    from ..train.recipe import build_recipe
    from ..train.trainer import is_main, run as run_training

    recipe = build_recipe(args, config_path=args.config)
    if args.resume and not recipe.output_dir:
        from ..errors import UserError

        raise UserError("--resume needs --output-dir (the run to continue)")
    from ..signals import terminate_as_interrupt

    from ..loading import remote_code

    # SIGTERM/SIGHUP stop training like Ctrl-C (the report is still written); remote code only with the flag
    with terminate_as_interrupt(), remote_code(args.trust_remote_code):
        report, out = run_training(recipe, fix=args.fix, resume=args.resume, overwrite=args.overwrite,
                                   ignore=ignored_ids(args.ignore), show_progress=not args.no_progress,
                                   dry_run=args.dry_run)
    if not is_main():
        from ..verdict import exit_code

        return exit_code(report.verdict)
    code = finish(report, args, show=True)
    where = report.run.get("report_file") or out / "report.json"
    if report.run.get("report_write_error"):  # a full disk or read-only folder at the end of the run
        from ..errors import UserError

        copy = f"a copy is at {where}" if report.run.get("report_file") else "no fallback copy could be written either"
        raise UserError(f"{report.run['report_write_error']}; the report was printed above and {copy}")
    print(f"report: {where}")
    if report.run.get("status") == "interrupted":
        return int(report.run.get("exit_code") or 130)
    return code
