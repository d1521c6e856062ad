"""A forward activation or a backward gradient reaches inf/NaN in fp16/bf16: names the module,
the phase and the dtype limit it went past."""
from __future__ import annotations

from sftdoctor.findings import Finding
from sftdoctor.stepstats import LOW_PRECISION

id = "precision-overflow"
level = "step"
summary = "a forward activation or backward gradient overflows fp16/bf16 (module, phase, dtype limit)"
needs = ("step", "forward_stats")
family = "numerical"
priority = 10
cause = "An activation or gradient overflowed the dtype's range and became inf/NaN."
remedy = "dtype"


def check(ctx) -> list[Finding]:
    r = ctx.step
    hit = None
    for phase in ("forward", "backward"):
        if phase == "backward" and r.scaler_active:
            break  # a GradScaler expects and handles backward infs: loss-scale-skipped-steps reports those
        prev = None
        for row in r.activations:
            if row["phase"] != phase:
                continue
            if not row["finite"]:
                if row["dtype"] in LOW_PRECISION:
                    hit = (row, prev)
                break  # only the first non-finite one in this phase is a cause; the rest inherit it
            prev = row
        if hit:
            break
    if hit is None:
        return []
    row, prev = hit
    value = row["max_abs"]
    is_nan = isinstance(value, float) and value != value
    near = prev is not None and prev["max_abs"] is not None and prev["limit"] and prev["max_abs"] >= prev["limit"] / 4
    # NaN with nothing near the limit before it is not an overflow: NaN came in (weights, inputs, 0/0)
    kind = "nan-without-overflow" if is_nan and not near else ("overflow-nan" if is_nan else "overflow-inf")
    what = {"overflow-inf": f"overflowed to inf in {row['dtype']}",
            "overflow-nan": f"went NaN in {row['dtype']} after values near its limit",
            "nan-without-overflow": (f"is NaN in {row['dtype']} with no value near the limit before it: NaN weights or "
                                     "inputs (or 0/0), not a range overflow")}[kind]
    return [Finding(
        id=id, severity="fail", level=level,
        message=(f"{row['phase']} output of {row['module']} {what} "
                 f"(limit {row['limit']:g})" + (f"; the module called before it peaked at {prev['max_abs']:.3g}" if prev else "")),
        evidence={"step": r.step, "module": row["module"], "phase": row["phase"], "value": row["max_abs"],
                  "dtype": row["dtype"], "limit": row["limit"], "kind": kind,
                  "previous_module": prev["module"] if prev else None,
                  "previous_max_abs": prev["max_abs"] if prev else None},
        fix=("train in bf16 (or fp32) instead of fp16, or keep this module in fp32; a bf16-pretrained model "
             "(config dtype bfloat16) is not safe in fp16"),
    )]
