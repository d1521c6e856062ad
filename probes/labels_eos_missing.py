"""Every supervised response must end with a supervised EOS / end-of-turn token, or the model
never learns to stop (generation runs on to max_new_tokens)."""
from __future__ import annotations

import torch

from sftdoctor.context import IGNORE_INDEX
from sftdoctor.findings import Finding

from ._dataset import DatasetRule, by_rate
from ._common import arrays, eos_mask, last_index, length_limit, real_mask, rows_at_limit, rows_of, supervised_mask, token_ref

id = "labels-eos-missing"
level = "batch"
summary = "a supervised response does not end with a supervised EOS / end-of-turn token"
needs = ("labels", "tokenizer")
family = "learned"
priority = 16
cause = "Responses end without a supervised EOS: the model never learns to stop."
remedy = "eos"
# Over a dataset: 1% of answers without a supervised EOS fails (stopping is learned from every
# row); fewer warns (a few stray rows barely move what the model learns about stopping).
dataset = DatasetRule(count="rows_without_eos", what="have no supervised EOS after their answer", severity=by_rate(0.01),
                      worst="-supervised")


def check(ctx) -> list[Finding]:
    b, tok = ctx.batch, ctx.tokenizer
    if not tok.eos_ids:
        return []
    a = arrays(ctx)
    if not (a.sup.any(axis=1) & ~(a.sup & a.eos).any(axis=1)).any():
        return []  # every supervised row has a supervised EOS (sup is real positions only)
    sup = supervised_mask(ctx)
    has_sup = sup.any(dim=1)
    eos = eos_mask(ctx) & real_mask(ctx)
    missing = has_sup & ~(sup & eos).any(dim=1)
    if not bool(missing.any()):
        return []
    # Why each row lacks it: an EOS right after the last supervised token with label -100 (masked),
    # or none there at all (never appended, or cut by truncation).
    last_sup = last_index(sup)
    after = (last_sup + 1).clamp(max=b.input_ids.shape[1] - 1)
    eos_after = eos.gather(1, after.unsqueeze(1)).squeeze(1) & (last_sup + 1 < b.input_ids.shape[1])
    label_after = b.labels.gather(1, after.unsqueeze(1)).squeeze(1)
    masked = missing & eos_after & (label_after == IGNORE_INDEX)
    truncated = missing & ~masked & rows_at_limit(ctx)
    if length_limit(ctx) is None and bool((missing & ~masked & ~truncated).any()):
        # without a known max_length, full-width rows are only truncation suspects; padded rows
        # lacking the EOS too say the EOS is never appended, so count them all here
        truncated = torch.zeros_like(truncated)
    absent = missing & ~masked & ~truncated
    counted = masked | absent  # truncated rows are truncation-answer-lost's finding, not this one's
    n = int(counted.sum())
    if n == 0:
        return []
    n_rows = int(has_sup.sum())
    pad_cause = tok.pad_is_eos and bool(masked.any()) and bool(
        (b.input_ids.gather(1, after.unsqueeze(1)).squeeze(1)[masked] == tok.pad_id).any())
    # Pre-shifted labels move the EOS label one position early (onto the last answer token).
    eos_id_after = b.input_ids.gather(1, after.unsqueeze(1)).squeeze(1)
    label_at_last = b.labels.gather(1, last_sup.clamp(min=0).unsqueeze(1)).squeeze(1)
    shifted = bool((masked & (label_at_last == eos_id_after)).any())
    parts = []
    if int(masked.sum()):
        parts.append(f"{int(masked.sum())} have the EOS masked to -100"
                     + (" (pad == eos masked by id: see pad-is-eos-masked, the root cause)" if pad_cause else "")
                     + (" (its label sits one position early: see labels-misaligned)" if shifted else ""))
    if int(absent.sum()):
        parts.append(f"{int(absent.sum())} have no EOS after the answer")
    if shifted:
        fix = "align labels with input_ids (no pre-shift): the EOS label then sits on the EOS token"
    elif pad_cause:
        fix = ("mask padding by position (labels[attention_mask == 0] = -100), not by id, so the answer's EOS keeps "
               "its label; or give the tokenizer a pad token that is not eos")
    elif int(masked.sum()):
        fix = ("include the EOS / end-of-turn token in the supervised span (for chat data: the assistant mask must "
               "cover <|im_end|> / <|eot_id|>)")
    else:
        fix = ("append tokenizer.eos_token_id to every answer before building labels (the tokenizer does not add it: "
               "tokenizer(text) stops at the text) and keep its label")
    return [Finding(
        id=id, severity="fail", level=level,
        message=f"{n} of {n_rows} supervised rows have no supervised EOS: " + "; ".join(parts),
        evidence={
            "rows": rows_of(counted),
            "rows_without_eos": n,
            "supervised_rows": n_rows,
            "share_of_rows": round(n / max(n_rows, 1), 4),
            "rows_eos_masked": int(masked.sum()),
            "rows_eos_absent": int(absent.sum()),
            "rows_truncated_excluded": int(truncated.sum()),
            "pad_is_eos_masked": pad_cause,
            "labels_shifted": shifted,
            "eos_looked_for": [token_ref(tok, i) for i in sorted(tok.eos_ids)],
        },
        fix=fix,
    )]
