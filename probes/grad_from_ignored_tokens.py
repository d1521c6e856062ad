"""Gradient flows into the logits at positions that must carry no loss: padding (fail) or prompt
tokens the labels mark as ignored (warn). Read from d loss / d logits, so it works for any loss a
user computes, labels passed to the model or not."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "grad-from-ignored-tokens"
level = "step"
summary = "gradient into the logits at padding (or ignored prompt) positions, from d loss / d logits"
needs = ("step", "logits_grad")
family = "learned"
priority = 20
cause = "Gradient reaches the logits at positions that should carry no loss."
remedy = "collator"


def check(ctx) -> list[Finding]:
    r = ctx.step
    t = r.targets
    by = t["supervised_by_class"]
    n_sup = max(t["supervised_positions"], 1)
    per_class_grad = {c: v.get("grad_norm") for c, v in r.by_class.items() if "grad_norm" in v}
    out = []
    if by.get("pad"):
        out.append(Finding(
            id=id, severity="fail", level=level,
            message=(f"{by['pad']} padding positions get gradient ({by['pad'] / n_sup:.0%} of all positions with "
                     f"loss): the model is trained to predict padding"),
            evidence={"step": r.step, "class": "pad", "positions": by["pad"], "share": round(by["pad"] / n_sup, 4),
                      "supervised_by_class": by, "grad_norm_by_class": per_class_grad,
                      "common_targets": t.get("common_targets", []), "pad_target_share": t["match"].get("pad")},
            fix="mask padding out of the loss: labels -100 where attention_mask == 0 (or weight 0 in your own loss)",
        ))
    if by.get("prompt") and not ctx.hints.prompt_supervised_on_purpose:
        out.append(Finding(
            id=id, severity="warn", level=level,
            message=f"{by['prompt']} positions that the labels mark as ignored (prompt) still get gradient",
            evidence={"step": r.step, "class": "prompt", "positions": by["prompt"], "share": round(by["prompt"] / n_sup, 4),
                      "supervised_by_class": by, "grad_norm_by_class": per_class_grad},
            fix="compute the loss from the labels (ignore_index=-100), or mask the prompt in your own loss",
        ))
    return out[:1] if out and out[0].severity == "fail" else out
