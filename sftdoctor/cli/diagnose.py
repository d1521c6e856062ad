"""`sftdoctor diagnose PATH_OR_HUB_ID`: the post-mortem of a saved model. Tells a numerical
cause (NaN weights, logits that overflow in the served dtype) from a learned one (finite logits
that prefer the pad / id-0 token), from the checkpoint alone."""
from __future__ import annotations

import argparse

from ..dtypes import long_name
from .common import add_output_options, finish


def add_parser(sub) -> None:
    p = sub.add_parser(
        "diagnose",
        help="check a saved model: weights, logits in fp32 vs its dtype, greedy generation (the !!!! symptom)",
        description=("Check a saved model (a save_pretrained folder or a Hub id): a streamed scan of the weights, "
                     "forward passes in float32 and in the dtype it is served in, greedy generation of a few "
                     "GSM8K-style prompts, and the tokenizer / generation_config end tokens."),
    )
    p.add_argument("model", metavar="PATH_OR_HUB_ID", help="the saved model folder (or Hub id)")
    p.add_argument("--base", metavar="PATH_OR_HUB_ID",
                   help="the model it was fine-tuned from: same checks under identical settings, plus per-tensor weight change")
    p.add_argument("--prompts", metavar="FILE",
                   help="questions to generate from: a .jsonl with a question field (GSM8K) or a text file, one per line")
    p.add_argument("--prompt-format", metavar="TEXT",
                   help="how a question becomes a prompt: a format with {question} (default 'Question: {question}\\nAnswer:'), or 'chat' for the chat template")
    p.add_argument("--tokenizer", metavar="DIR_OR_ID", help="tokenizer to use when the model folder has none")
    p.add_argument("--dtype", type=long_name, choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="the dtype the model is served in (default auto: the stored dtype; fp32/fp16/bf16 are accepted too); float32 is always checked too")
    p.add_argument("--attn-implementation", choices=["eager", "sdpa"], metavar="{eager,sdpa}",
                   help="attention kernel as your serving stack runs it (fp16 overflow of Q.K^T shows under eager; default: transformers' choice)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="greedy tokens per prompt (default 64)")
    p.add_argument("--num-prompts", type=int, default=8, metavar="N", help="prompts to run (default 8)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off by default)")
    add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import ignored_ids
    from ..diagnose import diagnose

    try:  # transformers' "Loading weights" bars are noise between our report lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass

    report = diagnose(
        args.model, base=args.base, prompts=args.prompts, dtype=None if args.dtype == "auto" else args.dtype,
        max_new_tokens=args.max_new_tokens, num_prompts=args.num_prompts, trust_remote_code=args.trust_remote_code,
        tokenizer=args.tokenizer, prompt_format=args.prompt_format, attn_implementation=args.attn_implementation,
        ignore=ignored_ids(args.ignore),
    )
    return finish(report, args)
