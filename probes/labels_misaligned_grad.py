"""labels-misaligned, seen from the gradient: the effective target of each logits row (the most
negative coordinate of d loss / d logits) should be input_ids[t + 1]. A loss that targets
input_ids[t + 2] (labels shifted twice) or input_ids[t] (no shift) is named whatever code computed
it. Emitted at level `step` (the batch-level probe of the same id reads the labels instead)."""
from __future__ import annotations

from sftdoctor.findings import Finding
from sftdoctor.stepstats import CORRECT_OFFSET

id = "labels-misaligned"
level = "step"
summary = "the loss scores the logits at t against the token at t+k, k != 1 (double shift / no shift), read from d loss / d logits"
needs = ("step", "logits_grad")
family = "learned"
priority = 10
cause = "Labels are shifted against the inputs: the model is trained to predict the wrong token."
remedy = "collator"

MIN_POSITIONS = 8
MIN_MATCH = 0.8


def check(ctx) -> list[Finding]:
    t = ctx.step.targets
    # padding rows are another failure (grad-from-ignored-tokens); judge alignment on the rest
    n = t["supervised_positions"] - t["supervised_by_class"].get("pad", 0)
    if n < MIN_POSITIONS:
        return []
    match = {int(k): v for k, v in t["match"].items() if k != "pad" and v is not None}
    best = max(match, key=lambda k: match[k])
    if best == CORRECT_OFFSET or match[best] < MIN_MATCH or match[best] <= match.get(CORRECT_OFFSET, 0.0):
        return []
    what = {0: "the loss scores the logits at position t against the token at t (no shift: an identity copy)",
            2: "the loss scores the logits at position t against the token at t + 2 (labels shifted twice)"}
    return [Finding(
        id=id, severity="fail", level=level,
        message=f"{what.get(best, f'the loss scores position t against the token at t + {best}')}: {match[best]:.0%} of positions with loss",
        evidence={"step": ctx.step.step, "source": "gradient", "best_offset": best, "expected_offset": CORRECT_OFFSET,
                  "k": best - CORRECT_OFFSET, "match_rate": match[best], "match_rates": t["match"],
                  "supervised_positions": t["supervised_positions"]},
        fix=("pass unshifted labels (labels = input_ids, masked with -100) to an HF *ForCausalLM, which shifts "
             "internally; in your own loss shift exactly once: logits of positions 0..T-2 against labels of 1..T-1"),
    )]
