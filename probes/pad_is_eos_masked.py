"""pad == eos and labels masked by token id: the real EOS at the end of each answer is masked
with the padding, so the model never learns to stop (root cause of never-stops)."""
from __future__ import annotations

from sftdoctor.context import IGNORE_INDEX
from sftdoctor.findings import Finding
from sftdoctor.tokens import TokenClass

from ._common import arrays, eos_mask, labeled_mask, rows_of, token_ref

id = "pad-is-eos-masked"
level = "batch"
summary = "pad == eos and labels were masked by id, so the real EOS is masked too"
needs = ("labels", "tokenizer")
family = "learned"
priority = 12
cause = "Masking pad by id also masked the real EOS, so the model never learns to stop."
remedy = "collator"


def masked_real_eos(ctx):
    """[B, T] bool: real EOS positions (found by position, see sftdoctor.tokens) holding the pad id
    whose label is -100 while the token before them is supervised: the answer's own EOS, masked."""
    b, tok = ctx.batch, ctx.tokenizer
    eos_here = (ctx.token_classes == int(TokenClass.EOS)) & (b.input_ids == tok.pad_id)
    labeled = labeled_mask(ctx)
    unsupervised = ~labeled
    prev_supervised = labeled.roll(1, dims=1)
    prev_supervised[:, 0] = False
    # the answer already ended with a supervised end token (e.g. <|im_end|>, pad <|endoftext|> after it):
    # the pad id that follows is padding, not the answer's EOS
    prev_end = eos_mask(ctx).roll(1, dims=1)
    prev_end[:, 0] = False
    prev_supervised &= ~prev_end
    return eos_here & unsupervised & prev_supervised, eos_here & prev_supervised


def check(ctx) -> list[Finding]:
    tok = ctx.tokenizer
    if not tok.pad_is_eos:
        return []
    a = arrays(ctx)
    # quick screen, the same condition as masked_real_eos's first result, on numpy views
    eos_here = (a.classes[:, 1:] == int(TokenClass.EOS)) & (a.ids[:, 1:] == tok.pad_id)
    if not (eos_here & ~a.labeled[:, 1:] & a.labeled[:, :-1] & ~a.eos[:, :-1]).any():
        return []
    masked, ends = masked_real_eos(ctx)
    n_masked, n_ends = int(masked.sum()), int(ends.sum())
    if n_masked == 0:
        return []
    b = ctx.batch
    pad_positions = b.input_ids == tok.pad_id
    all_pad_ids_masked = bool((b.labels[pad_positions] == IGNORE_INDEX).all())
    return [Finding(
        id=id, severity="fail", level=level,
        message=(f"pad == eos ({tok.pad_token!r}, id {tok.pad_id}) and {n_masked} of {n_ends} answer-ending EOS "
                 f"tokens have label -100: labels were masked by id, so the model never learns to stop"),
        evidence={
            "pad": token_ref(tok, tok.pad_id),
            "eos_ids": sorted(tok.eos_ids),
            "masked_eos_positions": n_masked,
            "answer_end_eos_positions": n_ends,
            "share_masked": round(n_masked / max(n_ends, 1), 4),
            "every_pad_id_masked": all_pad_ids_masked,
            "rows": rows_of(masked.any(dim=1)),
        },
        fix=("mask padding by position, not by id: labels[attention_mask == 0] = -100 (or "
             "DataCollatorForSeq2Seq(label_pad_token_id=-100)) instead of labels[labels == pad_token_id] = -100; "
             "better, give the tokenizer a pad token that is not eos"),
    )]
