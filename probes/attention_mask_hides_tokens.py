"""attention_mask must be 0 only on padding. Zeros on real tokens hide them from every later
token: a loss mask passed as attention_mask hides the question from the answer."""
from __future__ import annotations

from sftdoctor.context import IGNORE_INDEX
from sftdoctor.findings import Finding

from ._dataset import DatasetRule
from ._common import arrays, first_index, real_mask, rows_of

id = "attention-mask-hides-tokens"
level = "batch"
summary = "attention_mask is 0 on real (non-pad) tokens, e.g. a loss mask passed as attention_mask"
needs = ("attention_mask",)
family = "learned"
priority = 14
cause = "The attention mask hides real tokens (a loss mask passed as attention_mask?): the answer cannot see the question."
remedy = "collator"

dataset = DatasetRule(what="have real tokens hidden by attention_mask", sum_keys=("hidden_real_tokens",))


def check(ctx) -> list[Finding]:
    a = arrays(ctx)
    if not (a.real & (a.am == 0)).any():  # no real token is hidden
        return []
    b = ctx.batch
    am = b.attention_mask != 0
    real = real_mask(ctx)
    hidden = real & ~am
    n_hidden = int(hidden.sum())
    if n_hidden == 0:
        return []
    n_real = int(real.sum())
    pad = ~real
    attended_pad = int((pad & am).sum())
    evidence = {
        "hidden_real_tokens": n_hidden,
        "real_tokens": n_real,
        "share_hidden": round(n_hidden / max(n_real, 1), 4),
        "rows": rows_of(hidden.any(dim=1)),
        "first_hidden": _first(hidden),
        "attended_pad_positions": attended_pad,
    }
    same_as_loss_mask = None
    if b.labels is not None:
        # compare on real tokens: a loss mask is 1 exactly where labels carry loss (padding aside)
        loss_mask = b.labels != IGNORE_INDEX
        if b.loss_mask is not None:
            loss_mask = b.loss_mask != 0
        same_as_loss_mask = bool((loss_mask[real] == am[real]).all())
        evidence["equals_loss_mask"] = same_as_loss_mask
    # inverted: (almost) all text hidden and (almost) all padding attended; "almost" because where
    # pad == eos the position rule reads the first attended pad id as the row's real EOS
    inverted = attended_pad > 0 and n_hidden >= 0.9 * n_real and attended_pad >= 0.9 * int(pad.sum())
    evidence["inverted"] = inverted
    if same_as_loss_mask:
        cause = "attention_mask equals the loss mask (labels != -100): the prompt is invisible to the answer"
        fix = ("pass attention_mask = 1 on every real token and 0 only on padding (what the tokenizer returns); "
               "express the loss mask only through labels = -100 on the prompt")
    elif inverted:
        cause = "the mask looks inverted (1 on padding, 0 on text)"
        fix = "invert the mask: attention_mask = 1 on real tokens, 0 on padding"
    else:
        cause = "these tokens are invisible to every later token"
        fix = ("set attention_mask to 0 only on padding positions (a contiguous run at one end of the row); mask the "
               "loss with labels = -100 instead")
    return [Finding(
        id=id, severity="fail", level=level,
        message=f"attention_mask is 0 on {n_hidden} of {n_real} real tokens: {cause}",
        evidence=evidence, fix=fix,
    )]


def _first(mask) -> dict:
    rows = mask.any(dim=1).nonzero().flatten()
    r = int(rows[0])
    return {"row": r, "position": int(first_index(mask[r:r + 1])[0])}
