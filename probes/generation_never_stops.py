"""Greedy generation must reach an end token: a model that runs to max_new_tokens on most
prompts never learned EOS (typically pad == eos with labels masked by token id)."""
from __future__ import annotations

from sftdoctor.checkpoint import check_generation_outputs
from sftdoctor.findings import Finding

id = "generation-never-stops"
level = "checkpoint"
summary = "greedy generation reaches max_new_tokens without EOS on most prompts"
needs = ("checkpoint", "tokenizer")


def check(ctx) -> list[Finding]:
    rec, tok = ctx.checkpoint, ctx.tokenizer
    got = check_generation_outputs([g["prompt_ids"] for g in rec.generations], [g["output_ids"] for g in rec.generations],
                                   tok, max_new_tokens=rec.max_new_tokens, logits_nonfinite=rec.logits_nonfinite)
    found = [f for f in got if f.id == id]
    for f in found:
        f.evidence["dtype"] = rec.generation_dtype
        f.evidence["pad_id"] = tok.pad_id
        if rec.special_rows:
            f.evidence["eos_row_norms"] = [{"token_id": r["token_id"], "ratio_to_mean": r["ratio_to_mean"]}
                                           for r in rec.special_rows if r["token_id"] in tok.eos_ids][:4]
    return found
