"""`sftdoctor train`: fine-tune with a known-good recipe; refuse a run the probes know is
broken, and with --fix repair what has a remedy."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_output_options, finish

EPILOG = """examples:
  sftdoctor train --fix                          tiny random-init model, synthetic GSM8K-format problems, CPU, minutes
  sftdoctor train --fix --max-steps 20           the same, capped at 20 optimizer steps: a quick look
  sftdoctor train --collator examples.incident_collator:collate --fix --max-steps 30
                                                 your own collator (module:function); --fix swaps in the built-in one
  sftdoctor train --model Qwen/Qwen2.5-0.5B --data openai/gsm8k --eval-limit 0 --output-dir runs/qwen-gsm8k
                                                 the real run, on a GPU: Qwen2.5-0.5B on GSM8K (Hub), 3 epochs,
                                                 evaluated on the full test split (1,319 problems); bf16 on GPUs that have it
  torchrun --nproc_per_node 8 -m sftdoctor train --model Qwen/Qwen2.5-0.5B --data openai/gsm8k
                                                 the same, data parallel on 8 GPUs
  sftdoctor diagnose runs/qwen-gsm8k/final       then check the saved model

--dtype takes fp32/float32, bf16/bfloat16 or fp16/float16. The tiny default model is random-init:
it learns the answer format of real GSM8K but cannot solve its problems; use a pretrained --model
(a GPU) for GSM8K, or the synthetic default data on the CPU.

exit code: 0 trained (or --dry-run passed), 1 preflight or a probe found a failure, 2 bad input."""



def add_parser(sub) -> None:
    from ..train.recipe import add_recipe_arguments

    p = sub.add_parser(
        "train",
        help="fine-tune with a known-good recipe, gated by the probes (--fix repairs what it can)",
        description="Supervised fine-tuning on HF Trainer. Preflight runs the probes on the first real batches; "
                    "a fail finding stops the run unless --fix, which applies each known remedy and says what it changed. "
                    "With no argument: a tiny random-init model on built-in GSM8K-format problems, on the CPU, in minutes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def tiny_on_real_data(recipe) -> bool:
    return recipe.model == "tiny" and recipe.data != "synthetic"


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
    for line in what_next(report, out, args, recipe):
        print(line)
    if report.run.get("status") == "interrupted":
        return int(report.run.get("exit_code") or 130)
    return code


def what_next(report, out: Path, args: argparse.Namespace, recipe) -> list[str]:
    """The closing lines: where things are, what to run next, what the numbers mean."""
    status = report.run.get("status")
    rel = _shown(out)
    lines = ["", "what next:"]
    if status == "refused":
        lines += ["  nothing was trained: preflight found the failures above.",
                  "  fix them in your pipeline, or rerun the same command with --fix to apply each remedy:",
                  # the refused run left its report in --output-dir: rerunning there needs --overwrite
                  f"    {_command(args, extra=['--fix'] + (['--overwrite'] if recipe.output_dir else []))}"]
        return lines
    if status == "dry-run":
        lines += ["  preflight passed; rerun without --dry-run to train:", f"    {_command(args, drop=['--dry-run'])}"]
        return lines
    if status == "stopped":
        lines += ["  training stopped at the failure above; nothing final was saved.",
                  f"  the full evidence: sftdoctor report {rel}/report.json --html {rel}/report.html",
                  f"  per-step loss, grad norm and learning rate: {rel}/steps.jsonl"]
        return lines
    final = f"{rel}/final"
    lines += [f"  the model:    {final} (weights, tokenizer, generation_config: from_pretrained loads it)",
              f"  check it:     sftdoctor diagnose {final}",
              f"  the report:   sftdoctor report {rel}/report.json --html {rel}/report.html",
              f"  every step:   {rel}/steps.jsonl (loss, grad norm, learning rate)"]
    ev = report.metrics.get("eval")
    if ev:
        n = ev.get("examples", "?")
        lines += [f"  the metrics, greedy generation on {n} held-out problems:",
                  f"    exact match {ev['accuracy']:.1%}: the number after '####' equals the reference answer's",
                  f"    format      {ev['format_rate']:.1%}: the answer ends with a '#### N' line, then the end token",
                  f"    stop        {ev['stop_rate']:.1%}: generation ended with the end token within the budget"]
        if tiny_on_real_data(recipe):
            from ..train.pipeline import TINY_ON_REAL_DATA  # printed as a note before training too

            lines.append(f"  note: {TINY_ON_REAL_DATA}")
        elif ev.get("accuracy", 0) < 0.5 and recipe.model == "tiny":
            lines.append("  a low exact match from the tiny model means it is undertrained: more steps (drop --max-steps, "
                         "raise --epochs) or a bigger model (--tiny-hidden 128) raise it")
    return lines


def _shown(path: Path) -> str:
    """The path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def _command(args: argparse.Namespace, extra: list[str] = (), drop: list[str] = ()) -> str:
    """The user's own train command again, with flags added (skipped when already there) or dropped."""
    import shlex

    argv = [a for a in (getattr(args, "argv", None) or ["train"]) if a not in drop]
    k = 0
    while k < len(extra):  # extra: flags, each optionally followed by its value
        flag, value = extra[k], (extra[k + 1] if k + 1 < len(extra) and not extra[k + 1].startswith("--") else None)
        k += 2 if value is not None else 1
        if flag not in argv:
            argv += [flag] + ([value] if value is not None else [])
    return "sftdoctor " + " ".join(shlex.quote(a) for a in argv)
