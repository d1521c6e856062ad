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
    p.add_argument("--batch", metavar="FILE", help="a torch.save'd dict as your collator returns it")
    p.add_argument("--tokenizer", metavar="DIR_OR_ID", help="tokenizer folder or Hub id (with --batch)")
    p.add_argument("--model", metavar="DIR_OR_ID", help="model folder or Hub id; a folder with only config.json is enough for batch checks")
    p.add_argument("--max-length", type=int, metavar="N", help="the max_length the rows were truncated to (for truncation checks)")
    add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import ignored_ids

    ignore = ignored_ids(args.ignore)
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


def load_batch_file(path: str) -> dict:
    import torch

    p = Path(path)
    if not p.is_file():
        raise UserError(f"batch file {path} does not exist; save one with torch.save(batch, '{p.name}') in your loop")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read {path} as a torch.save'd batch ({first[:160]})") from None
    return obj


def from_file(args: argparse.Namespace, ignore: set[str]):
    from ..api import inspect_batch
    from ..loading import has_weights, load_config, load_model, load_tokenizer

    batch = load_batch_file(args.batch)
    if not args.tokenizer:
        raise UserError("--batch needs --tokenizer DIR_OR_ID (the tokenizer the batch was built with)")
    tok = load_tokenizer(args.tokenizer)
    model = None
    if args.model:
        model = load_model(args.model) if has_weights(args.model) else load_config(args.model)
    hints = {"max_length": args.max_length} if args.max_length else {}
    return inspect_batch(batch, tok, model, hints=hints, ignore=ignore)
