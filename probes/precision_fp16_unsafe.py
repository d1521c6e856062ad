"""fp16 is used with a model whose checkpoint is bf16 (config dtype bfloat16: its activations are
known to exceed fp16's range), or fp16 parameters are optimised by Adam with an eps that rounds
to 0 in fp16 (v ~ 0 then divides by zero: NaN weights after the first step)."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "precision-fp16-unsafe"
level = "step"
summary = "fp16 used on a bf16 checkpoint, or fp16 params with an Adam eps that rounds to 0"
needs = ("step",)
family = "numerical"
priority = 6
cause = "fp16 where it is not safe (pure fp16 weights with Adam, or a bf16 checkpoint run in fp16): the setup that makes values overflow or go NaN."
remedy = "dtype"
fix_on_warn = True


def check(ctx) -> list[Finding]:
    d = ctx.step.dtypes or {}
    fp16 = d.get("param") == "float16" or d.get("autocast") == "float16" or d.get("logits") == "float16"
    if not fp16:
        return []
    reasons = []
    if d.get("config") == "bfloat16":
        reasons.append("checkpoint-bf16")
    if d.get("adam_eps_fp16_zero"):
        reasons.append("adam-eps-rounds-to-zero")
    if d.get("param") == "float16" and "adam" in str(d.get("optimizer") or "").lower():
        # model.half() + Adam: no fp32 master weights; small updates round away and the state under/overflows
        reasons.append("pure-fp16-adam")
    if not reasons:
        return []
    parts = []
    if "checkpoint-bf16" in reasons:
        parts.append("the checkpoint was trained in bfloat16 but runs in float16")
    if "adam-eps-rounds-to-zero" in reasons:
        parts.append(f"{d.get('optimizer')} eps {d['adam_eps_fp16_zero'][0]:g} is 0 in float16 parameters")
    if "pure-fp16-adam" in reasons:
        parts.append(f"the parameters themselves are float16 and {d.get('optimizer')} updates them directly (no fp32 "
                     "master weights: updates below fp16 resolution are lost, the Adam state under/overflows)")
    return [Finding(
        id=id, severity="warn", level=level,
        message="; ".join(parts),
        evidence={"step": ctx.step.step, "reasons": reasons, "config_dtype": d.get("config"),
                  "param_dtype": d.get("param"), "autocast_dtype": d.get("autocast"),
                  "optimizer": d.get("optimizer"), "eps": (d.get("adam_eps_fp16_zero") or [None])[0]},
        fix=("train in bf16 (or fp32 weights with autocast); keep optimizer state and master weights in fp32 "
             "(mixed precision), never pure fp16 with Adam eps 1e-8"),
    )]
