"""A model finite in float32 must stay finite in the dtype it is served in. fp16 tops out at
65504: bf16-pretrained models (Qwen2.x, Gemma) overflow there and print `!!!!`."""
from __future__ import annotations

from sftdoctor.checkpoint import DTYPE_LIMITS, FP16_MAX
from sftdoctor.findings import Finding

id = "precision-inference-overflow"
level = "checkpoint"
summary = "finite in fp32 but overflows in the dtype it is served in (fp16)"
needs = ("checkpoint",)
family = "numerical"
priority = 11
cause = "The model overflows in the dtype it is served in, though finite in fp32."
remedy = None


def _broken(f) -> bool:
    return not (f["logits_finite"] and f["activations_finite"])


def _act(f, module):
    return next((a for a in f["activations"] if a["module"] == module), None)


def check(ctx) -> list[Finding]:
    rec = ctx.checkpoint
    fp32 = rec.forward.get("float32")
    if fp32 is None or _broken(fp32):
        return []  # not finite even in fp32: a weights or model problem, not the dtype's
    out = []
    for dtype, f in rec.forward.items():
        if dtype == "float32" or not _broken(f):
            continue
        module = f["first_nonfinite_module"]
        start = fp32["first_over_fp16_module"] if dtype == "float16" else None
        at = _act(fp32, start or module) or {}
        ev = {
            "dtype": dtype, "served": bool(f.get("served")), "limit": DTYPE_LIMITS.get(dtype),
            "module": module, "fp32_module": start or module, "fp32_max_abs": at.get("max_abs"),
            "logits_nonfinite_share": f["nonfinite_share"],
            "fp32_max_activation": max((a["max_abs"] for a in fp32["activations"]), default=None),
        }
        if dtype == "float16":
            ev["weights_over_fp16_limit"] = [w["name"] for w in rec.weights if (w["max_abs"] or 0) > FP16_MAX][:8]
        if rec.base is not None and dtype in rec.base.forward:
            ev["base_overflows"] = _broken(rec.base.forward[dtype])
            # how much the fine-tune moved the weights of the module where the overflow starts
            prefix = (start or module or "") + "."
            ev["weight_change_at_module"] = [{"name": c["name"], "relative_change": c["relative_change"]}
                                             for c in rec.weight_change if c["name"].startswith(prefix)]
        served = bool(f.get("served"))
        where = f" from {start or module}" if (start or module) else ""
        msg = (f"finite in float32 but {'overflows' if served else 'would overflow'} in {dtype}{where} "
               f"(fp32 max |activation| {ev['fp32_max_abs'] if ev['fp32_max_abs'] is not None else '?'} vs limit {ev['limit']:g})")
        if ev.get("base_overflows"):
            msg += "; the base model overflows too: this is inference numerics, not the fine-tune"
        out.append(Finding(
            id=id, severity="fail" if served else "warn", level=level, message=msg, evidence=ev,
            fix=(f"serve in bfloat16 or float32 (from_pretrained(..., dtype='auto') for a bf16 checkpoint), not {dtype}; "
                 "on GPUs without bf16 keep float32, or use attn_implementation='sdpa' which overflows less"),
        ))
    return out
