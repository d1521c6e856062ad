"""The loss of a micro-step is NaN or inf: the raw value handed to .backward() (or returned by
the model), seen before any logger can filter it out (HF `logging_nan_inf_filter`)."""
from __future__ import annotations

import math

from sftdoctor.findings import Finding

id = "loss-nonfinite"
level = "step"
summary = "the loss of a step is NaN or inf (raw, before any logging filter)"
needs = ("step",)
family = "numerical"
priority = 20
cause = "The loss is NaN or inf."
remedy = "dtype"


def check(ctx) -> list[Finding]:
    r = ctx.step
    values = {k: v for k, v in (("loss", r.loss), ("backward_loss", r.backward_loss)) if v is not None}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return []
    value = next(iter(bad.values()))
    logits_finite = r.logits is not None and r.logits.get("nonfinite_all_positions", r.logits.get("nonfinite_positions")) == 0
    acts_finite = bool(r.activations) and all(a["finite"] for a in r.activations if a.get("phase") == "forward")
    if math.isnan(value) and (r.supervised_tokens == 0 or r.empty_rows):
        # 0/0: a mean over zero supervised tokens (the whole batch, or one row of a per-row mean)
        where = ("no position of this micro-batch has a label" if r.supervised_tokens == 0 else
                 f"{r.empty_rows} row(s) of this micro-batch have no supervised token")
        return [Finding(
            id=id, severity="fail", level=level,
            message=(f"the loss of micro-step {r.step} is NaN from a division 0/0: {where}, and a mean over zero "
                     "tokens is NaN" + ("; the logits are finite, so this is not a numerical overflow" if logits_finite else "")),
            evidence={"step": r.step, "value": value, "source": r.loss_source, **bad, "cause": "empty-row-division",
                      "supervised_tokens": r.supervised_tokens, "empty_rows": r.empty_rows,
                      "logits_finite": logits_finite if r.logits is not None else None, "family": "learned"},
            fix=("drop examples whose answer was truncated away (no label left) before batching, or divide by "
                 "max(n_supervised, 1) / use reduction='sum' over the step's total supervised tokens instead of a "
                 "per-row mean"),
        )]
    if logits_finite and acts_finite:
        return [Finding(
            id=id, severity="fail", level=level,
            message=(f"the loss of micro-step {r.step} is {value} (source: {r.loss_source}) while the logits and every "
                     "activation are finite: the loss computation itself produced it"),
            evidence={"step": r.step, "value": value, "source": r.loss_source, **bad, "cause": "loss-computation",
                      "loss_scale": r.loss_scale, "dtype": r.dtypes.get("compute"), "family": "learned"},
            fix=("check the loss code for a division by a count that can be 0 (rows or batches with no supervised "
                 "token), log of 0, or a mask that removes every position"),
        )]
    return [Finding(
        id=id, severity="fail", level=level,
        message=f"the loss of micro-step {r.step} is {value} (source: {r.loss_source})",
        evidence={"step": r.step, "value": value, "source": r.loss_source, **bad,
                  "loss_scale": r.loss_scale, "dtype": r.dtypes.get("compute")},
        fix=("find the first non-finite module (logits-nonfinite / precision-overflow evidence); for fp16 use bf16 "
             "or fp32; check for micro-batches with no supervised token (0/0)"),
    )]
