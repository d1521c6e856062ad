"""Given position_ids must count the real tokens of each row from 0 (cumsum(attention_mask) - 1),
or restart at 0 at each document boundary of a packed row."""
from __future__ import annotations

import torch

from sftdoctor.findings import Finding

from ._common import document_starts, first_index, real_mask, rows_of

id = "position-ids-inconsistent"
level = "batch"
summary = "given position_ids do not match the mask or the packed document boundaries"
needs = ("position_ids",)
family = "learned"
priority = 18
cause = "Position ids do not match the mask or document boundaries."
remedy = "collator"


def check(ctx) -> list[Finding]:
    b = ctx.batch
    pos = b.position_ids
    B, T = pos.shape
    real = real_mask(ctx)
    first_real = first_index(real)
    at_first = (torch.arange(T).unsqueeze(0) == first_real.unsqueeze(1)) & real
    # Positions count up by one along the real tokens of a row and start at 0 on its first one.
    expected = torch.zeros_like(pos)
    expected[:, 1:] = pos[:, :-1] + 1
    expected[at_first] = 0
    resets = real & ~at_first & (pos == 0)  # a packed row restarts at 0 for each document
    packed_rows = resets.any(dim=1, keepdim=True)
    bad = real & (pos != expected) & ~resets
    # In a row that does restart, every document boundary must restart.
    missed_reset = document_starts(ctx) & packed_rows & (pos != 0)
    expected[missed_reset] = 0
    bad |= missed_reset
    n = int(bad.sum())
    if n == 0:
        return []
    r = int(bad.any(dim=1).nonzero()[0])
    t = int(first_index(bad[r:r + 1])[0])
    first = {"row": r, "position": t, "expected": int(expected[r, t]), "got": int(pos[r, t])}
    return [Finding(
        id=id, severity="fail", level=level,
        message=(f"position_ids disagree with the mask/documents at {n} positions in {int(bad.any(dim=1).sum())} rows; "
                 f"first at row {r}, position {t}: expected {first['expected']}, got {first['got']}"),
        evidence={
            "first_mismatch": first,
            "mismatched_positions": n,
            "rows": rows_of(bad.any(dim=1)),
            "packed_rows": int(packed_rows.sum()),
            "missed_document_resets": int(missed_reset.sum()),
        },
        fix=("build position_ids from the mask: (attention_mask.cumsum(-1) - 1).clamp(min=0) for padded rows; for "
             "packed rows restart at 0 at every document (DataCollatorWithFlattening does this)"),
    )]
