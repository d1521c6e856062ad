"""A parameter gradient is NaN/inf after the backward (when no GradScaler is there to skip the
step; with one, loss-scale-skipped-steps reports it)."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "grad-nonfinite"
level = "step"
summary = "a parameter gradient is NaN/inf (no GradScaler to skip the step)"
needs = ("step", "backward")
family = "numerical"
priority = 14
cause = "Parameter gradients are NaN/inf, so updates corrupt the weights."
remedy = "dtype"


def check(ctx) -> list[Finding]:
    r = ctx.step
    if not r.nonfinite_grad_params or r.scaler_active:
        return []
    names = r.nonfinite_grad_params
    return [Finding(
        id=id, severity="fail", level=level,
        message=f"{len(names)} parameter gradient(s) are NaN/inf after micro-step {r.step}, e.g. {names[0]}",
        evidence={"step": r.step, "count": len(names), "parameters": names[:20],
                  "with_grad": (r.params or {}).get("with_grad"), "grad_norm": r.grad_norm},
        fix=("an optimizer step now writes NaN into the weights: find the non-finite loss or activation first "
             "(loss-nonfinite, precision-overflow); clip gradients and use bf16 or a GradScaler for fp16"),
    )]
