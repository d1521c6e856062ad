"""The loss or the gradient norm spikes far above its running level (median of the previous
steps) and stays up the next step (or explodes, >= 10x), or the loss climbs above its first value and
stays there (a learning rate far too high).
Spikes: only steps not seen by an earlier pass, each against the window before it; a step with
far fewer supervised tokens than usual (an epoch's last partial batch) is never called a spike."""
from __future__ import annotations

import math
import statistics

from sftdoctor.findings import Finding

id = "loss-divergence"
level = "run"
level_name = level
summary = "loss or grad norm spikes far above its running median"
needs = ("run",)
family = "numerical"
priority = 26
cause = "The loss diverged (learning rate too high?)."
remedy = None

WINDOW = 50
MIN_HISTORY = 8
EXPLODE = 10.0  # x the running median: reported at once; below it, the next step must confirm
CONFIRM = 1.5  # ... by staying above this many times the running median
LIGHT_SHARE = 0.5  # a step with under half the window's median supervised tokens is not judged for spikes
FIRST_STEPS = 3  # the starting level: median loss of the first steps
RECENT_STEPS = 5  # the current level: median loss of the last steps (all above the start)
RISE_FACTOR, RISE_MARGIN = 1.2, 0.5  # recent level > 1.2x the start and > start + 0.5 nats
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


def _light(recs, i) -> bool:
    """A micro-step with far fewer supervised tokens than its window (the last partial batch of an
    epoch): its mean loss and its gradient are noisy by nature, a jump there is not a divergence."""
    n = recs[i].supervised_tokens
    prev = [x.supervised_tokens for x in recs[max(0, i - WINDOW): i] if x.supervised_tokens]
    return bool(n is not None and prev and n < LIGHT_SHARE * statistics.median(prev))


def _rose_and_stayed(recs) -> Finding | None:
    """The loss climbed above its first value and the recent steps stay there (a learning rate far too
    high: it rises in a few steps, then plateaus high). A healthy run only goes down from its first loss."""
    if len(recs) < MIN_HISTORY:
        return None
    # O(1) per pass: only the first and the last few records are read

    def finite(rs):
        return [(r.step, r.loss) for r in rs if r.loss is not None and math.isfinite(r.loss)]

    head, tail = finite(recs[:FIRST_STEPS]), finite(recs[-RECENT_STEPS:])
    if not head or len(tail) < RECENT_STEPS:
        return None
    first = statistics.median(v for _, v in head)
    recent = [v for _, v in tail]
    losses = tail
    level = statistics.median(recent)
    if level > RISE_FACTOR * first and level - first > RISE_MARGIN and min(recent) > first:
        return Finding(
            id=id, severity="warn", level=level_name,
            message=(f"the loss rose from {first:.4g} (first steps) to {level:.4g} and stays there over the last "
                     f"{len(recent)} steps: training diverged (learning rate too high?)"),
            evidence={"step": losses[-1][0], "quantity": "loss", "kind": "rose-and-stayed", "first_loss": first,
                      "recent_median": level, "ratio": round(level / first, 3) if first else None,
                      "recent_steps": len(recent)},
            fix="lower the learning rate (often by 10-1000x; 1e-5..1e-4 for a pretrained model), add warmup and clipping",
        )
    return None


def check(ctx) -> list[Finding]:
    run = ctx.run
    recs = run.records
    # the last record of the previous pass is looked at again: its successor may now confirm it
    for i in range(max(run.checked_records - 1, MIN_HISTORY), len(recs)):
        r = recs[i]
        if _light(recs, i):
            continue
        for key, (factor, mad_factor, margin) in RULES.items():
            prev = [getattr(x, key) for x in recs[max(0, i - WINDOW): i]]
            med = _spike(prev, getattr(r, key), factor, mad_factor, margin)
            if med is None:
                continue
            value = getattr(r, key)
            if value < EXPLODE * med:
                # a one-off bump (a hard batch; the last step of a run) is not a divergence: the next
                # step must stay up too, unless it is an explosion
                nxt = getattr(recs[i + 1], key) if i + 1 < len(recs) else None
                if nxt is None or not math.isfinite(nxt) or nxt < CONFIRM * med:
                    continue
            return [Finding(
                id=id, severity="warn", level=level,
                message=f"{key.replace('_', ' ')} jumped to {value:.4g} at step {r.step} ({value / med:.1f}x its running median {med:.4g})",
                evidence={"step": r.step, "quantity": key, "value": value, "running_median": med,
                          "ratio": round(value / med, 3) if med else None, "window": WINDOW},
                fix="lower the learning rate, add warmup and gradient clipping (max_grad_norm=1.0); look at the batch of that step",
            )]
    rose = _rose_and_stayed(recs) if len(recs) > run.checked_records else None
    return [rose] if rose is not None else []
