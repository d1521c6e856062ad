"""config.tie_word_embeddings must agree with the saved lm_head / embedding tensors, or a loader
either initialises lm_head randomly or silently drops the trained one."""
from __future__ import annotations

from sftdoctor.checkpoint import tied_findings
from sftdoctor.findings import Finding

id = "tied-weights-mismatch"
level = "checkpoint"
summary = "tie_word_embeddings disagrees with the saved lm_head / embedding tensors"
needs = ("checkpoint",)


def check(ctx) -> list[Finding]:
    return tied_findings(ctx.checkpoint.tied)
