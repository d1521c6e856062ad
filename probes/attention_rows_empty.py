"""Under causal masking a query at position t sees keys s <= t with attention_mask 1. A real token
after an all-zero prefix sees no key at all: eager attention spreads it uniformly, some SDPA
kernels return NaN there (and the NaN can spread)."""
from __future__ import annotations

import numpy as np

from sftdoctor.findings import Finding

from ._common import MAX_LISTED, arrays, real_mask, rows_of

id = "attention-rows-empty"
level = "batch"
summary = "query positions that can see no key under causal masking (all-masked prefix)"
needs = ("attention_mask",)
remedy = "collator"


def check(ctx) -> list[Finding]:
    a = arrays(ctx)
    T = a.real.shape[1]
    attended = a.am != 0
    first_key = np.where(attended.any(axis=1), attended.argmax(axis=1), T)
    first_real = np.where(a.real.any(axis=1), a.real.argmax(axis=1), T)
    if not (first_real < first_key).any():
        return []  # every row's first real token comes at or after its first visible key
    b = ctx.batch
    visible_keys = (b.attention_mask != 0).long().cumsum(dim=1)  # keys a causal query at t can see
    no_key = visible_keys == 0
    real = real_mask(ctx)
    empty = no_key & real
    n = int(empty.sum())
    if n == 0:
        return []
    spans = []
    for r in empty.any(dim=1).nonzero().flatten()[:MAX_LISTED].tolist():
        pos = empty[r].nonzero().flatten()
        spans.append({"row": int(r), "start": int(pos[0]), "end": int(pos[-1]) + 1, "count": int(pos.numel())})
    return [Finding(
        id=id, severity="warn", level=level,
        message=(f"{n} real-token query positions in {len(spans)} rows see no key (attention_mask is 0 on every "
                 "position up to them, so they are also hidden: see attention-mask-hides-tokens): uniform attention "
                 "in eager kernels, NaN in some SDPA kernels"),
        evidence={
            "positions": n,
            "rows": rows_of(empty.any(dim=1)),
            "spans": spans,
            "pad_positions_without_key": int((no_key & ~real).sum()),
        },
        fix=("keep attention_mask 1 on every real token (the first token of each row must be visible); if a prefix "
             "must carry no loss, mask it with labels = -100 instead"),
    )]
