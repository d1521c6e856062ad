"""Gradient accumulation weights tokens unequally: the loss is averaged per micro-batch while the
micro-batches of one optimizer step hold different numbers of supervised tokens, so a token of a
short micro-batch counts more. Read from d loss / d logits: the per-token weight w of a
cross-entropy loss (g[target] = w * (p - 1)) is ~1/n_i per micro-batch when averaged per
micro-batch and the same for all micro-batches when normalised by the step's total token count."""
from __future__ import annotations

import math
import statistics

from sftdoctor.findings import Finding

id = "grad-accum-normalization"
level = "run"
summary = "loss averaged per micro-batch while supervised-token counts differ across micro-batches"
needs = ("run",)
remedy = None

MIN_COUNT_SPREAD = 1.25  # max/min supervised tokens across micro-batches worth checking


def _judge(records):
    n = [r.supervised_tokens for r in records]
    w = [r.token_weight for r in records]
    if any(x is None or x <= 0 for x in n + w) or len(n) < 2:
        return None
    spread_n = max(n) / min(n)
    if spread_n < MIN_COUNT_SPREAD:
        return None
    per_micro_mean = statistics.pstdev([math.log(a * b) for a, b in zip(w, n)])  # w ~ 1/n_i: w*n constant
    global_norm = statistics.pstdev([math.log(a) for a in w])  # w constant
    if per_micro_mean >= global_norm:
        return None
    return {"supervised_tokens": n, "token_weights": [float(f"{x:.6g}") for x in w],
            "weight_spread": round(max(w) / min(w), 4), "token_count_spread": round(spread_n, 4)}


def check(ctx) -> list[Finding]:
    run = ctx.run
    for ostep in run.optimizer_steps[run.checked_optimizer_steps:]:
        if len(ostep.micro_steps) < 2:
            continue
        recs = [run.record(s) for s in ostep.micro_steps]
        if any(r is None or not r.full for r in recs):
            continue
        ev = _judge(recs)
        if ev is None:
            continue
        return [Finding(
            id=id, severity="warn", level=level,
            message=(f"optimizer step {ostep.index} averages the loss per micro-batch: micro-batches hold "
                     f"{min(ev['supervised_tokens'])}-{max(ev['supervised_tokens'])} supervised tokens, so a token's "
                     f"weight varies {ev['weight_spread']:.2f}x"),
            evidence={"optimizer_step": ostep.index, "micro_steps": ostep.micro_steps, **ev},
            fix=("divide the summed token loss by the supervised-token count of the whole optimizer step "
                 "(HF Trainer: num_items_in_batch; own loop: reduction='sum' / total tokens)"),
        )]
    return []
