"""Saved weights must be finite: one NaN tensor makes every forward NaN, and argmax of NaN
logits is token 0 (`!` in GPT-2/Qwen vocabularies: the `!!!!` incident, numerical family)."""
from __future__ import annotations

from sftdoctor.checkpoint import nonfinite_weight_findings
from sftdoctor.findings import Finding

id = "weights-nonfinite"
level = "checkpoint"
summary = "saved weights contain NaN/inf"
needs = ("checkpoint",)


def check(ctx) -> list[Finding]:
    rec = ctx.checkpoint
    return nonfinite_weight_findings(rec.weights, base_weights=rec.base.weights if rec.base is not None else None)
