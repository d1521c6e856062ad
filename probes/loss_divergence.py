"""The loss or the gradient norm spikes far above its running level (median of the previous
steps). Looks only at steps not seen by an earlier pass, each against the window before it."""
from __future__ import annotations

import math
import statistics

from sftdoctor.findings import Finding

id = "loss-divergence"
level = "run"
summary = "loss or grad norm spikes far above its running median"
needs = ("run",)
WINDOW = 50
MIN_HISTORY = 8
RULES = {  # quantity: (x median, x MAD, absolute margin)
    "loss": (2.5, 10.0, 0.5),
    "grad_norm": (10.0, 10.0, 0.0),
}


def _spike(history, value, factor, mad_factor, margin):
    vals = [v for v in history if v is not None and math.isfinite(v)]
    if len(vals) < MIN_HISTORY or value is None or not math.isfinite(value):
        return None
    med = statistics.median(vals)
    mad = statistics.median(abs(v - med) for v in vals)
    if value > factor * med and value - med > mad_factor * mad and value - med > margin:
        return med
    return None


def check(ctx) -> list[Finding]:
    run = ctx.run
    recs = run.records
    for i in range(max(run.checked_records, MIN_HISTORY), len(recs)):
        r = recs[i]
        for key, (factor, mad_factor, margin) in RULES.items():
            prev = [getattr(x, key) for x in recs[max(0, i - WINDOW): i]]
            med = _spike(prev, getattr(r, key), factor, mad_factor, margin)
            if med is None:
                continue
            value = getattr(r, key)
            return [Finding(
                id=id, severity="warn", level=level,
                message=f"{key.replace('_', ' ')} jumped to {value:.4g} at step {r.step} ({value / med:.1f}x its running median {med:.4g})",
                evidence={"step": r.step, "quantity": key, "value": value, "running_median": med,
                          "ratio": round(value / med, 3) if med else None, "window": WINDOW},
                fix="lower the learning rate, add warmup and gradient clipping (max_grad_norm=1.0); look at the batch of that step",
            )]
    return []
