"""A GradScaler skips optimizer steps (inf/NaN gradients) or its scale keeps falling: the logged
loss looks fine while nothing is learned."""
from __future__ import annotations

from sftdoctor.findings import Finding

id = "loss-scale-skipped-steps"
level = "run"
summary = "GradScaler skips optimizer steps or its scale keeps falling"
needs = ("run",)
family = "numerical"
priority = 24
cause = "The GradScaler skipped optimizer steps: the loss looks fine while nothing is learned."
remedy = "dtype"

WINDOW = 200  # optimizer steps looked at
MIN_SKIPPED = 3
MIN_SHARE = 0.25
MIN_SCALE = 1.0


def check(ctx) -> list[Finding]:
    run = ctx.run
    if not run.scaler_seen or not run.optimizer_steps:
        return []
    steps = run.optimizer_steps[-WINDOW:]
    # Skips before the first successful step are the scaler calibrating its initial scale: normal.
    first_ok = next((i for i, o in enumerate(steps) if not o.skipped), None)
    after = steps[first_ok:] if first_ok is not None else []
    skipped_after = [o.index for o in after if o.skipped]
    skipped = [o.index for o in steps if o.skipped]
    share = len(skipped_after) / max(len(after), 1)
    scales = run.scales[-WINDOW:]
    low_scale = bool(scales) and scales[-1] < MIN_SCALE  # no real run needs a scale below 1: the grads are inf/NaN
    if not ((len(skipped_after) >= MIN_SKIPPED and share >= MIN_SHARE) or low_scale):
        return []
    return [Finding(
        id=id, severity="warn", level=level,
        message=(f"GradScaler skipped {len(skipped)} of {len(steps)} optimizer steps"
                 + (f"; scale fell to {scales[-1]:g}" if scales else "")),
        evidence={"skipped": len(skipped), "optimizer_steps": len(steps), "share": round(len(skipped) / len(steps), 4),
                  "skipped_after_calibration": len(skipped_after),
                  "skipped_steps": skipped[:50], "scale_trajectory": scales[-50:],
                  "last_scale": scales[-1] if scales else None},
        fix=("gradients overflow even at a small scale: find the overflowing module (precision-overflow), use bf16 "
             "instead of fp16, lower the learning rate or clip gradients"),
    )]
