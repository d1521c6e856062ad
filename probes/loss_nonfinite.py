"""The loss of a micro-step is NaN or inf: the raw value handed to .backward() (or returned by
the model), seen before any logger can filter it out (HF `logging_nan_inf_filter`)."""
from __future__ import annotations

import math

from sftdoctor.findings import Finding

id = "loss-nonfinite"
level = "step"
summary = "the loss of a step is NaN or inf (raw, before any logging filter)"
needs = ("step",)


def check(ctx) -> list[Finding]:
    r = ctx.step
    values = {k: v for k, v in (("loss", r.loss), ("backward_loss", r.backward_loss)) if v is not None}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return []
    value = next(iter(bad.values()))
    return [Finding(
        id=id, severity="fail", level=level,
        message=f"the loss of micro-step {r.step} is {value} (source: {r.loss_source})",
        evidence={"step": r.step, "value": value, "source": r.loss_source, **bad,
                  "loss_scale": r.loss_scale, "dtype": r.dtypes.get("compute")},
        fix=("find the first non-finite module (logits-nonfinite / precision-overflow evidence); for fp16 use bf16 "
             "or fp32; check for micro-batches with no supervised token (0/0)"),
    )]
