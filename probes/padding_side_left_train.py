"""Left padding in training without position_ids that account for it: an HF forward uses
arange position ids, so every left-padded row starts its text at a shifted position (and the
model sees padding tokens at positions 0..n-1)."""
from __future__ import annotations

from sftdoctor.findings import Finding
from sftdoctor.tokens import TokenClass

from ._dataset import DatasetRule
from ._common import MAX_LISTED, arrays, first_index, rows_of

id = "padding-side-left-train"
level = "batch"
summary = "left padding in training without position_ids that account for it"
needs = ("batch",)
remedy = "collator"

dataset = DatasetRule(what="are left-padded without matching position_ids")


def check(ctx) -> list[Finding]:
    real = arrays(ctx).real
    if not (~real[:, 0] & real.any(axis=1)).any():
        return []  # no row starts with padding (the `left` rows below)
    b = ctx.batch
    pad = ctx.token_classes == int(TokenClass.PAD)
    left = pad[:, 0] & ~pad.all(dim=1)  # rows whose padding sits at the start
    if not bool(left.any()):
        return []
    first_real = first_index(~pad)
    if b.position_ids is not None:
        # accounted for when the first real token of each left-padded row has position 0
        pos_first = b.position_ids.gather(1, first_real.clamp(min=0).unsqueeze(1)).squeeze(1)
        left &= pos_first != 0
        if not bool(left.any()):
            return []
    n = int(left.sum())
    absolute = bool(ctx.model is not None and ctx.model.uses_absolute_positions)
    return [Finding(
        id=id, severity="warn", level=level,
        message=(f"{n} of {b.input_ids.shape[0]} rows are left-padded "
                 + ("with no position_ids" if b.position_ids is None else "and position_ids do not start at 0 on the text")
                 + ": their text starts at shifted positions" + (" (learned absolute positions: this changes the input)" if absolute else "")),
        evidence={
            "rows": rows_of(left),
            "pad_side": "left",
            "leading_pad": [{"row": int(r), "count": int(first_real[r])} for r in left.nonzero().flatten()[:MAX_LISTED].tolist()],
            "position_ids_given": b.position_ids is not None,
            "tokenizer_padding_side": ctx.tokenizer.padding_side if ctx.tokenizer is not None else None,
            "absolute_positions": absolute,
        },
        fix=("pad on the right for training (tokenizer.padding_side = 'right'), or pass "
             "position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)"),
    )]
