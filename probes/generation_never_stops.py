"""Greedy generation must reach an end token. A fail names the cause (EOS never supervised, or
pad == eos with nothing saying EOS was supervised: labels masked by token id mask it); with EOS
supervised in training (a model saved by `sftdoctor train` says so) or no cause found, it is a
warn: undertrained, not broken."""
from __future__ import annotations

from sftdoctor.checkpoint import check_generation_outputs
from sftdoctor.findings import Finding

id = "generation-never-stops"
level = "checkpoint"
summary = "greedy generation reaches max_new_tokens without EOS on most prompts"
needs = ("checkpoint", "tokenizer")


def check(ctx) -> list[Finding]:
    rec, tok = ctx.checkpoint, ctx.tokenizer
    training = ctx.hints.get("training")
    got = check_generation_outputs([g["prompt_ids"] for g in rec.generations], [g["output_ids"] for g in rec.generations],
                                   tok, max_new_tokens=rec.max_new_tokens, logits_nonfinite=rec.logits_nonfinite,
                                   training=training)
    found = [f for f in got if f.id == id]
    for f in found:
        f.evidence["dtype"] = rec.generation_dtype
        f.evidence["pad_id"] = tok.pad_id
        if rec.special_rows:
            f.evidence["eos_row_norms"] = [{"token_id": r["token_id"], "ratio_to_mean": r["ratio_to_mean"]}
                                           for r in rec.special_rows if r["token_id"] in tok.eos_ids][:4]
    return found
