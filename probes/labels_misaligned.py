"""Supervised labels must copy input_ids at offset 0 (HF convention: the model shifts inside).
Pre-shifted labels (labels[t] == input_ids[t+1]) given to an HF model train next-next-token
prediction: the loss still falls, generations skip tokens."""
from __future__ import annotations

import numpy as np
import torch

from sftdoctor.findings import Finding

from ._common import arrays, rows_of, supervised_mask

id = "labels-misaligned"
level = "batch"
summary = "supervised labels are offset from input_ids (pre-shifted labels: next-next-token training)"
needs = ("labels",)
family = "learned"
priority = 10
cause = "Labels are shifted against the inputs: the model is trained to predict the wrong token."
remedy = "collator"

OFFSETS = (-2, -1, 0, 1, 2)
MIN_POSITIONS = 16  # fewer compared positions than this: too little to judge
GOOD_MATCH = 0.9  # labels that copy input_ids at k=0 match (almost) everywhere
CLEAR_WIN = 0.5  # a k != 0 must match at least this share, and beat k=0 by this margin


def _match(labels: torch.Tensor, ids: torch.Tensor, sup: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (matches, compared) of labels[t] == ids[t+k] over supervised t with t+k inside the row."""
    B, T = ids.shape
    shifted = torch.full_like(ids, -1)
    valid = torch.zeros_like(sup)
    if k >= 0:
        shifted[:, : T - k] = ids[:, k:]
        valid[:, : T - k] = True
    else:
        shifted[:, -k:] = ids[:, : T + k]
        valid[:, -k:] = True
    compared = sup & valid
    return ((labels == shifted) & compared).sum(1), compared.sum(1)


def check(ctx) -> list[Finding]:
    a = arrays(ctx)
    n0 = int(np.count_nonzero(a.sup))  # offset 0 compares every supervised position
    if n0 < MIN_POSITIONS or float(np.count_nonzero((a.labels == a.ids) & a.sup)) / n0 >= GOOD_MATCH:
        return []  # the usual case, decided by offset 0 alone (the same early returns as below)
    b = ctx.batch
    sup = supervised_mask(ctx)
    rates, per_row = {}, {}
    for k in OFFSETS:
        hits, n = _match(b.labels, b.input_ids, sup, k)
        per_row[k] = (hits, n)
        rates[k] = float(hits.sum()) / max(int(n.sum()), 1)
    compared = int(per_row[0][1].sum())
    if compared < MIN_POSITIONS:
        return []
    if rates[0] >= GOOD_MATCH:
        return []  # labels copy input_ids: the HF convention
    # offsets compared on too few positions (short rows: t+k falls outside) cannot win
    judged = [k for k in OFFSETS if int(per_row[k][1].sum()) >= MIN_POSITIONS]
    best = max(judged, key=lambda k: (rates[k], -abs(k)))  # ties go to the smaller shift, 0 first
    misaligned = best != 0 and rates[best] >= CLEAR_WIN and rates[best] - rates[0] >= CLEAR_WIN / 2
    if not misaligned and rates[best] >= CLEAR_WIN:
        return []  # no clear winner (very repetitive text): nothing to prove
    evidence = {
        "best_offset": best,
        "match_rate": round(rates[best], 4),
        "match_rate_offset_0": round(rates[0], 4),
        "rate_by_offset": {str(k): round(r, 4) for k, r in rates.items()},
        "compared_positions": compared,
    }
    if misaligned:
        # rows whose own best offset is `best`
        hits_best, n_best = per_row[best]
        hits0, n0 = per_row[0]
        row_rate_best = hits_best / n_best.clamp(min=1)
        row_rate0 = hits0 / n0.clamp(min=1)
        evidence["rows"] = rows_of((row_rate_best > row_rate0) & (n_best > 0))
        direction = "pre-shifted" if best > 0 else "shifted the wrong way"
        return [Finding(
            id=id, severity="fail", level=level,
            message=(f"labels match input_ids at offset {best:+d} ({rates[best]:.0%} of {compared} supervised positions) "
                     f"but only {rates[0]:.0%} at offset 0: labels are {direction}, so the model learns to predict "
                     f"{abs(best) + 1} tokens ahead"),
            evidence=evidence,
            fix=("pass labels aligned with input_ids (labels = input_ids.clone() with -100 where no loss) and let the HF "
                 "model shift by one inside; remove your own labels[:, 1:] / input_ids[:, :-1] shift, or keep it and "
                 "compute the loss yourself without a second shift"),
        )]
    return [Finding(
        id=id, severity="warn", level=level,
        message=(f"supervised labels equal input_ids at no offset in -2..2 (best {best:+d}: {rates[best]:.0%} of "
                 f"{compared} positions): labels do not come from these input_ids"),
        evidence=evidence,
        fix="build labels from the same token ids as input_ids (labels = input_ids.clone(), then set -100 where no loss)",
    )]
