"""Every input id must index a row of the model's embedding (a pad token added to the tokenizer
without resize_token_embeddings is the usual cause), and every label is an id or -100.

Without the model's embedding size, ids at or above len(tokenizer) are reported as a warning:
the model may have spare rows (Qwen2.5 has 151936 for 151665 tokens), but the tokenizer cannot
have produced those ids, so the batch was built with another tokenizer."""
from __future__ import annotations

from sftdoctor.context import IGNORE_INDEX
from sftdoctor.findings import Finding

from ._common import arrays, rows_of, token_ref
from ._dataset import DatasetRule

id = "token-id-out-of-range"
level = "batch"
summary = "an input or label id is >= the model's embedding rows, or negative other than -100"
needs = ("batch",)
family = "setup"
priority = 8
cause = "A token id is beyond the embedding table (new token without resize)."
remedy = "vocab"
# One row with an id past the embedding crashes a CUDA run (device-side assert) or trains on
# garbage: the severity stays the worst batch's (fail whenever the model's size is known).
dataset = DatasetRule(what="hold an input id or label out of range", sum_keys=("input_ids_out_of_range", "labels_out_of_range"))


def check(ctx) -> list[Finding]:
    b, tok, model = ctx.batch, ctx.tokenizer, ctx.model
    ids, labels = b.input_ids, b.labels
    rows_limit = model.embedding_rows if model is not None and model.embedding_rows else None
    vocab_len = tok.vocab_len if tok is not None and tok.vocab_len else None
    limit = rows_limit or vocab_len
    a = arrays(ctx)
    if ids.numel() and a.ids.min() >= 0 and (limit is None or a.ids.max() < limit) and (
            a.labels is None or (not ((a.labels < 0) & (a.labels != IGNORE_INDEX)).any()
                                 and (limit is None or a.labels.max() < limit))):
        return []  # every id and label is in range (the counts below would be 0)
    bad_ids = ids < 0
    bad_labels = None
    if labels is not None:
        bad_labels = (labels < 0) & (labels != IGNORE_INDEX)
    if limit is not None:
        bad_ids = bad_ids | (ids >= limit)
        if labels is not None:
            bad_labels = bad_labels | (labels >= limit)
    n_ids = int(bad_ids.sum())
    n_labels = int(bad_labels.sum()) if bad_labels is not None else 0
    if n_ids + n_labels == 0:
        return []
    negative = int((ids < 0).sum()) + (int(((labels < 0) & (labels != IGNORE_INDEX)).sum()) if labels is not None else 0)
    # Severity: negatives and ids past the model's embedding crash (CUDA device assert) or read
    # garbage: fail. Past the tokenizer only (model size unknown): warn.
    severity = "fail" if rows_limit is not None or negative else "warn"
    rows = bad_ids.any(dim=1) | (bad_labels.any(dim=1) if bad_labels is not None else bad_ids.any(dim=1))
    evidence = {
        "max_input_id": int(ids.max()),
        "min_input_id": int(ids.min()),
        "embedding_rows": rows_limit,
        "tokenizer_len": vocab_len,
        "limit_used": "model embedding rows" if rows_limit is not None else ("tokenizer length" if vocab_len else None),
        "input_ids_out_of_range": n_ids,
        "labels_out_of_range": n_labels,
        "negative_values": negative,
        "bad_values": sorted({int(v) for v in ids[bad_ids].unique()[:8].tolist()}
                             | ({int(v) for v in labels[bad_labels].unique()[:8].tolist()} if bad_labels is not None else set())),
        "rows": rows_of(rows),
    }
    if tok is not None and tok.pad_id is not None and limit is not None and tok.pad_id >= limit:
        evidence["pad"] = token_ref(tok, tok.pad_id)
    if negative:
        what = "negative ids/labels (only -100 may be negative)"
        fix = "pad and mask labels with -100 exactly (not -1) and input_ids with the pad id (never a negative value)"
    elif rows_limit is not None:
        what = f"ids >= the model's {rows_limit} embedding rows"
        fix = ("after adding tokens (e.g. a pad token) call model.resize_token_embeddings(len(tokenizer)) before "
               "training, or reuse an existing token as pad")
    else:
        what = f"ids >= len(tokenizer) = {vocab_len} (model embedding size unknown: pass the model or --model)"
        fix = ("build the batch with the same tokenizer you pass here; if tokens were added, resize the model's "
               "embeddings to len(tokenizer)")
    return [Finding(
        id=id, severity=severity, level=level,
        message=f"{n_ids} input ids and {n_labels} labels out of range: {what}; max input id {evidence['max_input_id']}",
        evidence=evidence, fix=fix,
    )]
