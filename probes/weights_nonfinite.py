"""Saved weights must be finite: one NaN tensor makes every forward NaN, and argmax of NaN
logits is token 0 (`!` in GPT-2/Qwen vocabularies: the `!!!!` incident, numerical family)."""
from __future__ import annotations

from typing import Any

from sftdoctor.findings import Finding

id = "weights-nonfinite"
level = "checkpoint"
summary = "saved weights contain NaN/inf"
needs = ("checkpoint",)
family = "numerical"
priority = 15
cause = "The saved weights hold NaN/inf: every forward pass is poisoned."
remedy = None


def judge(weights: list[dict[str, Any]], *, base_weights: list[dict[str, Any]] | None = None) -> list[Finding]:
    """The finding on per-tensor weight statistics (sftdoctor.checkpoint: scan_weights, state_dict_weights):
    a fail when any tensor holds NaN/inf. Also what `watch` runs on the weights a script saves."""
    bad = [w for w in weights if w["nan"] or w["inf"]]
    if not bad:
        return []
    total = sum(w["numel"] for w in weights)
    n_bad = sum(w["nan"] + w["inf"] for w in bad)
    evidence: dict[str, Any] = {
        "tensors": [{"name": w["name"], "dtype": w["dtype"], "nan": w["nan"], "inf": w["inf"], "numel": w["numel"]} for w in bad[:20]],
        "nonfinite_tensors": len(bad), "tensors_total": len(weights),
        "nonfinite_values": n_bad, "share_of_values": round(n_bad / max(total, 1), 6),
        "dtypes": sorted({w["dtype"] for w in bad}),
    }
    if base_weights is not None:
        evidence["base_nonfinite_tensors"] = sum(1 for w in base_weights if w["nan"] or w["inf"])
    fp16 = any(w["dtype"] == "float16" for w in bad)
    return [Finding(
        id=id, severity="fail", level=level,
        message=(f"{len(bad)} of {len(weights)} saved tensors hold NaN/inf ({n_bad} values, first: {bad[0]['name']}); "
                 "every forward pass through them is NaN, and argmax of NaN logits is token 0"),
        evidence=evidence,
        fix=("the training run wrote NaN: do not optimise fp16 parameters with Adam (eps=1e-8 rounds to 0 in fp16); "
             "keep fp32 master weights (torch.autocast + GradScaler, or bf16 mixed precision), and stop on the first "
             "non-finite loss/grad (sftdoctor watch)" if fp16 else
             "the training run wrote NaN/inf: find the first non-finite step (sftdoctor watch), lower the lr or "
             "clip gradients, and re-save from the last finite checkpoint"),
    )]


def check(ctx) -> list[Finding]:
    rec = ctx.checkpoint
    return judge(rec.weights, base_weights=rec.base.weights if rec.base is not None else None)
