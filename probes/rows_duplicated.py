"""Exact-duplicate rows over a whole dataset: the same token ids trained on several times
(a join or a concatenation done twice, a shuffled copy of a split). Duplicates are weighted
more than the rest, and a duplicated test item inflates evaluation."""
from __future__ import annotations

from sftdoctor.findings import Finding

from ._dataset import pct

id = "rows-duplicated"
level = "dataset"
summary = "rows whose token ids exactly repeat an earlier row of the dataset"
needs = ("dataset",)
remedy = None

WARN_SHARE = 0.01  # at least 1% of rows are repeats: warn (over-weighted data); fewer: info


def check(ctx) -> list[Finding]:
    dup = (ctx.dataset or {}).get("duplicates") or {}
    n, total = int(dup.get("rows_repeated") or 0), int(ctx.dataset.get("rows") or 0)
    if n == 0 or total == 0:
        return []
    share = n / total
    groups = dup.get("groups") or []
    top = groups[0] if groups else None
    msg = f"{n:,} of {total:,} rows ({pct(share)}) repeat an earlier row exactly ({int(dup.get('distinct_repeated') or 0):,} distinct rows repeated)"
    if top:
        msg += f"; most repeated: row {top['rows'][0]} x{top['count']}"
    return [Finding(
        id=id, severity="warn" if share >= WARN_SHARE else "info", level=level, message=msg,
        evidence={"rows_affected": n, "rows_total": total, "share_of_rows": round(share, 6),
                  "distinct_repeated": dup.get("distinct_repeated"), "examples": groups[:8],
                  "rows_hashed": dup.get("rows_hashed"), "complete": dup.get("complete", True)},
        fix="deduplicate the rows before training (e.g. datasets' .unique on the text, or a hash of input_ids), "
            "and check that no split was concatenated twice",
    )]
