"""No trainable parameter (or only a tiny share of them) receives a non-zero gradient, or trainable
parameters are missing from the optimizer (built before unfreezing, wrong param groups)."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "params-frozen"
level = "step"
summary = "no/too few trainable params get a non-zero grad, or trainable params are not in the optimizer"
needs = ("step",)
family = "setup"
priority = 9
cause = "Nothing (or almost nothing) that is trainable gets a gradient."
remedy = None

MIN_SHARE = 0.5  # share of trainable parameter elements that must receive a non-zero gradient
TINY_TRAINABLE = 0.01  # trainable share of all parameters below which "only norms/biases train" is a defect
FIX = ("set requires_grad on the weights you mean to train before building the optimizer; with gradient "
       "checkpointing and frozen embeddings call model.enable_input_require_grads(); check PEFT target_modules")


def check(ctx) -> list[Finding]:
    r = ctx.step
    p = r.params or {}
    out = []
    if r.logits_requires_grad is False or p.get("trainable") == 0:
        out.append(Finding(
            id=id, severity="fail", level=level,
            message="the logits do not require grad: no trainable parameter takes part in the forward",
            evidence={"step": r.step, "trainable": p.get("trainable", 0), "trainable_numel": p.get("trainable_numel", 0),
                      "logits_requires_grad": r.logits_requires_grad},
            fix=FIX,
        ))
    elif (r.backward_seen and p.get("trainable") and p.get("nonzero_share", 1.0) < MIN_SHARE
          # no supervised token means no loss signal at all: labels-no-supervised-tokens names that, not frozen weights
          and r.supervised_tokens != 0):
        out.append(Finding(
            id=id, severity="fail", level=level,
            message=(f"only {p['nonzero_grad']} of {p['trainable']} trainable tensors ({p['nonzero_share']:.1%} of "
                     f"trainable elements) received a non-zero gradient"),
            evidence={"step": r.step, "trainable": p["trainable"], "nonzero_grad": p["nonzero_grad"],
                      "with_grad": p.get("with_grad"), "nonzero_share": p["nonzero_share"],
                      "zero_grad_names": p.get("zero_grad_names", [])},
            fix=FIX,
        ))
    total = p.get("total_numel") or 0
    if (not out and total and p.get("trainable") and p.get("trainable_matrix_numel") == 0
            and p.get("trainable_numel", 0) / total < TINY_TRAINABLE):
        # a name filter meant for a LoRA model (e.g. "lora" in name) applied to a plain model: no weight
        # matrix trains, only the 1-D norm/bias vectors; a real adapter (LoRA A/B) is a matrix and passes
        share = p["trainable_numel"] / total
        out.append(Finding(
            id=id, severity="fail", level=level,
            message=(f"only {p['trainable']} 1-D tensors ({p['trainable_numel']:,} of {total:,} parameters, {share:.3%}) are "
                     "trainable: every weight matrix is frozen, so the model can barely learn (norm/bias vectors only)"),
            evidence={"step": r.step, "trainable": p["trainable"], "trainable_numel": p["trainable_numel"],
                      "total_numel": total, "trainable_share": round(share, 6), "trainable_matrix_numel": 0,
                      "trainable_names": p.get("trainable_names", [])},
            fix=("check the filter that sets requires_grad (a LoRA name filter such as 'lora' in name matches nothing in a "
                 "plain model): train the weight matrices, or wrap the model with PEFT before filtering"),
        ))
    if p.get("missing_from_optimizer_count"):
        out.append(Finding(
            id=id, severity="fail", level=level,
            message=f"{p['missing_from_optimizer_count']} trainable tensors are not in the optimizer and never change",
            evidence={"step": r.step, "missing_from_optimizer": p["missing_from_optimizer"],
                      "count": p["missing_from_optimizer_count"], "trainable": p.get("trainable")},
            fix="build the optimizer after choosing what to train: optimizer(p for p in model.parameters() if p.requires_grad)",
        ))
    return out[:1]
