"""Several documents packed into one row attend to each other unless something isolates them:
position ids that restart per document (with a varlen-aware attention), cu_seq_lens, or a
block-diagonal mask."""
from __future__ import annotations

from sftdoctor.findings import Finding

from ._common import MAX_LISTED, document_starts, may_have_document_starts, rows_of

id = "packing-cross-contamination"
level = "batch"
summary = "several documents share a row with no boundary isolation"
needs = ("tokenizer",)
remedy = "collator"

VARLEN_KEYS = {"cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "seq_idx",
               "max_length_q", "max_length_k", "seq_lens", "document_ids", "doc_ids"}


def check(ctx) -> list[Finding]:
    b = ctx.batch
    varlen = sorted(VARLEN_KEYS & set(b.extra_keys))
    if varlen:
        return []  # the attention is told where documents end
    if not may_have_document_starts(ctx):
        return []  # one document per row
    starts = document_starts(ctx)
    if b.position_ids is not None:
        # a start the position ids mark (restart at 0) is isolated by varlen-aware attention
        starts &= b.position_ids != 0
    docs_per_row = starts.sum(dim=1) + 1
    packed = docs_per_row > 1
    n = int(packed.sum())
    if n == 0:
        return []
    return [Finding(
        id=id, severity="warn", level=level,
        message=(f"{n} of {b.input_ids.shape[0]} rows hold several documents (up to {int(docs_per_row.max())}) that "
                 "attend to each other: no position-id restart, cu_seq_lens or block mask separates them"),
        evidence={
            "rows": rows_of(packed),
            "documents_per_row": [{"row": int(r), "documents": int(docs_per_row[r])} for r in packed.nonzero().flatten()[:MAX_LISTED].tolist()],
            "position_ids_given": b.position_ids is not None,
            "boundary_positions": [{"row": int(r), "position": int(t)} for r, t in starts.nonzero()[:MAX_LISTED].tolist()],
        },
        fix=("pack with boundaries: position_ids restarting at 0 per document plus a varlen attention "
             "(attn_implementation='flash_attention_2' or 'sdpa' with DataCollatorWithFlattening / TRL "
             "padding_free=True), or do not pack (one document per row, padded)"),
    )]
