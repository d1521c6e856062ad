"""Rows (or a whole micro-batch) with no supervised token: mean cross-entropy over zero targets
is 0/0 = NaN, or a fake 0.0 where a trainer clamps it."""
from __future__ import annotations

from sftdoctor.findings import Finding

from ._common import arrays, labeled_mask, real_mask, rows_of
from ._dataset import DatasetRule

id = "labels-no-supervised-tokens"
level = "batch"
summary = "rows or a whole micro-batch with zero supervised tokens (NaN or a fake 0.0 loss)"
needs = ("labels",)
family = "learned"
priority = 15
cause = "Some rows have no supervised token: their loss is 0/0 or a fake 0."
remedy = "empty_rows"


def _severity(t) -> str:
    # A whole micro-batch without a supervised token gives a NaN (or fake 0.0) loss: fail. Over a
    # dataset, 5% of rows carrying no loss is a broken masking recipe: fail; fewer rows only dilute.
    return "fail" if t.severities.get("fail") or t.share >= 0.05 else "warn"


dataset = DatasetRule(
    count="empty_rows", worst="-length", what="have no supervised token (every label -100): they train nothing",
    severity=_severity, worst_text=lambda e: f"row {e['row']} has {e['length']} tokens and 0 supervised",
)


def check(ctx) -> list[Finding]:
    if arrays(ctx).labeled.any(axis=1).all():
        return []  # every row has a label other than -100
    b = ctx.batch
    # Any label other than -100 carries loss (even on padding): that is what keeps the mean finite.
    per_row = labeled_mask(ctx).sum(dim=1)
    empty = per_row == 0
    n_empty, n_rows = int(empty.sum()), int(empty.numel())
    if n_empty == 0:
        return []
    whole = n_empty == n_rows
    no_text = empty & ~real_mask(ctx).any(dim=1)  # rows that are all padding
    # Severity: a whole micro-batch gives loss = NaN (or a clamped 0.0) for this step: fail.
    # Some rows only dilute the batch: warn.
    return [Finding(
        id=id, severity="fail" if whole else "warn", level=level,
        message=(f"no supervised token in the whole batch ({n_rows} rows): the loss is 0/0 = NaN or a fake 0.0"
                 if whole else
                 f"{n_empty} of {n_rows} rows have no supervised token (all labels -100)"),
        evidence={
            "rows": rows_of(empty),
            "empty_rows": n_empty,
            "share_of_rows": round(n_empty / n_rows, 4),
            "rows_all_padding": int(no_text.sum()),
            "supervised_tokens": int(per_row.sum()),
        },
        fix=("check the response marker/template used for completion-only masking actually matches the tokenized "
             "rows, raise max_length or truncate the prompt instead of the answer, and drop rows with no "
             "supervised token before batching"),
    )]
