"""Padding positions must carry label -100; otherwise the model learns to emit the pad token
(id 0 is `!` in GPT-2/Qwen vocabularies: the `!!!!` incident, learned family)."""
from __future__ import annotations

from collections import Counter

from sftdoctor.findings import Finding
from sftdoctor.tokens import TokenClass

from ._common import arrays, labeled_mask
from ._dataset import DatasetRule

id = "labels-pad-not-ignored"
level = "batch"
summary = "padding positions carry a real label instead of -100"
needs = ("labels",)
family = "learned"
priority = 10
cause = "Padding positions were trained as targets, so the model learned to emit the pad label."
remedy = "collator"

dataset = DatasetRule(what="supervise padding positions (label != -100 on pad)", sum_keys=("supervised_pad_positions",))


def check(ctx) -> list[Finding]:
    a = arrays(ctx)
    if not (a.labeled & ~a.real).any():  # no padding position carries a label
        return []
    b = ctx.batch
    pad = ctx.token_classes == int(TokenClass.PAD)
    supervised_pad = pad & labeled_mask(ctx)
    n = int(supervised_pad.sum())
    if n == 0:
        return []
    n_pad = int(pad.sum())
    values = Counter(b.labels[supervised_pad].tolist()).most_common(5)
    supervised_total = int(labeled_mask(ctx).sum())
    tok = ctx.tokenizer
    top_id = values[0][0]
    text = tok.token_text(top_id) if tok is not None else ""
    return [Finding(
        id=id, severity="fail", level=level,
        message=(f"{n} of {n_pad} padding positions are supervised ({n / max(supervised_total, 1):.0%} of all "
                 f"supervised tokens); most common label there is {top_id} {text!r}"),
        evidence={
            "supervised_pad_positions": n,
            "pad_positions": n_pad,
            "share_of_supervised": round(n / max(supervised_total, 1), 4),
            "label_values": [{"id": int(i), "text": tok.token_text(i) if tok else "", "count": c} for i, c in values],
            "rows": sorted({int(r) for r in supervised_pad.nonzero()[:, 0].tolist()})[:32],
        },
        fix=("set labels to -100 wherever attention_mask == 0 (pad labels with -100, e.g. "
             "DataCollatorForSeq2Seq(label_pad_token_id=-100) or F.pad(labels, ..., value=-100)), never with 0 or pad_id"),
    )]
