"""`sftdoctor inspect-batch`: run the batch probes (and step probes when a model is there) on
one batch: from a saved batch file, or captured from the user's own training script."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import add_output_options, finish


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect-batch",
        help="check one training batch (from a file, or the first one your script builds)",
        description="Check one collated training batch: labels, masks, padding, EOS, positions.",
    )
    p.add_argument("script", nargs="?", help="your training script: run until its first model forward, then inspected")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a module as the script (like python -m)")
    p.add_argument("--batch", metavar="FILE", help="a torch.save'd dict as your collator returns it (or a folder of them)")
    p.add_argument("--batches", metavar="N|all", type=_batches,
                   help="check N batches (or all) drawn through your script's own dataset and collator, no model "
                        "forward; findings are aggregated over the rows (see docs/dataset.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (with --batches)")
    p.add_argument("--tokenizer", metavar="DIR_OR_ID", help="tokenizer folder or Hub id (with --batch)")
    p.add_argument("--model", metavar="DIR_OR_ID", help="model folder or Hub id; a folder with only config.json is enough for batch checks")
    p.add_argument("--max-length", type=int, metavar="N", help="the max_length the rows were truncated to (for truncation checks)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the --model/--tokenizer folder's own Python code (off by default)")
    add_output_options(p)
    p.set_defaults(func=run)


def _batches(text: str):
    if text.strip().lower() == "all":
        return "all"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batches takes a positive number or 'all', not {text!r}")
    return n


_TAIL_OPTIONS = {"--batches": True, "--json": True, "--html": True, "--max-length": True, "--ignore": True,
                 "--no-progress": False, "--quiet": False, "-q": False}


def _own_options_after_script(args: argparse.Namespace) -> None:
    """`inspect-batch train.py --batches all --json out.json`: once --batches follows the script,
    sftdoctor's own options after it are sftdoctor's (the script keeps every other argument)."""
    tail = list(args.script_args or [])
    if "--batches" not in tail and not any(a.startswith("--batches=") for a in tail):
        return
    from .common import check_output_paths

    kept, i = [], 0
    while i < len(tail):
        name, _, inline = tail[i].partition("=")
        if name in _TAIL_OPTIONS:
            takes = _TAIL_OPTIONS[name]
            value = inline if inline else (tail[i + 1] if takes and i + 1 < len(tail) else None)
            if takes and value is None:
                raise UserError(f"{name} needs a value")
            dest = name.lstrip("-").replace("-", "_")
            if name == "--batches":
                args.batches = _batches(value)
            elif name == "--max-length":
                args.max_length = int(value)
            elif name == "--ignore":
                args.ignore.append(value)
            elif name in ("--quiet", "-q"):
                args.quiet = True
            elif name == "--no-progress":
                args.no_progress = True
            else:
                setattr(args, dest, value)
            i += 1 + (1 if takes and not inline else 0)
        else:
            kept.append(tail[i])
            i += 1
    args.script_args = kept
    check_output_paths(args)


def run(args: argparse.Namespace) -> int:
    from ..config import ignored_ids

    _own_options_after_script(args)
    ignore = ignored_ids(args.ignore)
    if args.batches is not None or (args.batch and Path(args.batch).is_dir()):
        return run_dataset(args, ignore)
    if args.batch:
        if args.script or args.module:
            raise UserError("give either --batch FILE or a script, not both")
        report = from_file(args, ignore)
    elif args.script or args.module:
        from ..intercept import inspect_script  # the script runner shared with `watch`

        script, script_args = args.script, list(args.script_args)
        if args.module and script:  # `-m pkg a b`: argparse took `a` for the script
            script, script_args = None, [script, *script_args]
        report = inspect_script(script, script_args, module=args.module, ignore=ignore, max_length=args.max_length)
    else:
        raise UserError("nothing to inspect: pass a training script (sftdoctor inspect-batch train.py) or --batch FILE --tokenizer DIR")
    return finish(report, args)


def from_file(args: argparse.Namespace, ignore: set[str]):
    from ..api import inspect_batch
    from ..loading import has_weights, load_config, load_model, load_tokenizer

    from ..loading import load_batch_file

    batch = load_batch_file(args.batch)
    if not args.tokenizer:
        raise UserError("--batch needs --tokenizer DIR_OR_ID (the tokenizer the batch was built with)")
    trust = args.trust_remote_code  # off unless --trust-remote-code: a folder's own Python never runs by default
    tok = load_tokenizer(args.tokenizer, trust_remote_code=trust)
    model = None
    if args.model:
        model = load_model(args.model, trust_remote_code=trust) if has_weights(args.model) else load_config(args.model, trust_remote_code=trust)
    hints = {"max_length": args.max_length} if args.max_length else {}
    return inspect_batch(batch, tok, model, hints=hints, ignore=ignore)


def run_dataset(args: argparse.Namespace, ignore: set[str]) -> int:
    """--batches N|all (a script) or --batch FOLDER: every batch checked, findings per dataset."""
    import sys

    from ..draw import inspect_folder, inspect_script_dataset

    n = None if args.batches in (None, "all") else int(args.batches)
    progress = not args.no_progress
    if args.batch:
        if args.script or args.module:
            raise UserError("give either --batch FOLDER or a script, not both")
        if not Path(args.batch).is_dir():
            raise UserError(f"--batches with --batch needs a folder of saved batches; {args.batch} is a file")
        if not args.tokenizer:
            raise UserError("--batch needs --tokenizer DIR_OR_ID (the tokenizer the batches were built with)")
        from ..loading import load_config, load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        model = load_config(args.model) if args.model else None
        hints = {"max_length": args.max_length} if args.max_length else {}
        report = inspect_folder(args.batch, tok, model, batches=n, hints=hints, ignore=ignore, progress=progress)
    elif args.script or args.module:
        script, script_args = args.script, list(args.script_args)
        if args.module and script:
            script, script_args = None, [script, *script_args]
        report = inspect_script_dataset(script, script_args, module=args.module, batches=n, ignore=ignore,
                                        max_length=args.max_length, progress=progress)
    else:
        raise UserError("nothing to inspect: pass a training script (sftdoctor inspect-batch train.py --batches all) "
                        "or --batch FOLDER --tokenizer DIR")
    code = finish(report, args)
    note = report.run.get("note")
    if report.run.get("coverage") == "collate-error":
        print(f"sftdoctor: error: {note}", file=sys.stderr)
        return 2
    if report.run.get("cap") and report.run.get("coverage") == "capped":
        print(f"sftdoctor: note: stopped at the cap: {report.run['cap']}", file=sys.stderr)
    bad = (report.metrics.get("dataset") or {}).get("bad_batches")
    if bad:
        reasons = (report.metrics["dataset"].get("bad_batch_reasons") or [""])[0]
        print(f"sftdoctor: note: {bad} batch(es) could not be checked ({reasons})", file=sys.stderr)
    if report.run.get("coverage") == "interrupted":
        return 130
    return code
