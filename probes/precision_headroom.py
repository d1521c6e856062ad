"""Activations come within a factor (4x) of the dtype's max without overflowing yet. For a run in
fp32/bf16 the same test is made against fp16's 65504 as a forecast (severity info): whether this
model would overflow if run in fp16."""
from __future__ import annotations

from sftdoctor.findings import Finding
from sftdoctor.stepstats import HEADROOM_FACTOR, LOW_PRECISION

id = "precision-headroom"
level = "step"
summary = "activations within 4x of the dtype max (fp16 forecast for fp32/bf16 runs)"
needs = ("step", "forward_stats")
family = "numerical"
priority = 30
remedy = "dtype"


def check(ctx) -> list[Finding]:
    r = ctx.step
    close = [a for a in r.activations if a["phase"] == "forward" and a["finite"] and a["dtype"] in LOW_PRECISION
             and a["limit"] and a["max_abs"] * HEADROOM_FACTOR > a["limit"]]
    if close:
        top = max(close, key=lambda a: a["max_abs"] / a["limit"])
        return [Finding(
            id=id, severity="warn", level=level,
            message=(f"{top['module']} reaches {top['max_abs']:.4g} in {top['dtype']}, "
                     f"{top['max_abs'] / top['limit']:.0%} of the dtype max"),
            evidence={"step": r.step, "module": top["module"], "max_abs": top["max_abs"], "dtype": top["dtype"],
                      "limit": top["limit"], "ratio": round(top["max_abs"] / top["limit"], 4), "factor": HEADROOM_FACTOR,
                      "modules": [{"module": a["module"], "max_abs": a["max_abs"]} for a in close][:10]},
            fix="switch to bf16 (same range as fp32) or keep the named modules in fp32",
        )]
    fc = r.fp16_forecast
    if fc and "float16" not in fc["source_dtypes"] and not fc["safe"]:
        worst = (fc["overflow"] or fc["headroom"])[0]
        return [Finding(
            id=id, severity="info", level=level,
            message=(f"forecast: in fp16 {len(fc['overflow'])} module(s) would overflow and {len(fc['headroom'])} "
                     f"come within {HEADROOM_FACTOR:g}x of 65504 (max {fc['max_abs']:.4g} at {fc['max_module']})"),
            evidence={"step": r.step, "forecast": True, "forecast_dtype": "float16", "module": worst["module"],
                      "max_abs": worst["max_abs"], "limit": fc["limit"], "ratio": fc["max_ratio"],
                      "overflow": fc["overflow"][:10], "headroom": fc["headroom"][:10],
                      "source_dtypes": fc["source_dtypes"]},
            fix="do not run or serve this model in fp16; use bf16 or fp32",
        )]
    return []
