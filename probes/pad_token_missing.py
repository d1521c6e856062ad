"""The tokenizer has no pad token: collators fail, or user code sets pad = eos and then masks
the real EOS along with the padding."""
from __future__ import annotations

from sftdoctor.findings import Finding

from ._common import token_ref

id = "pad-token-missing"
level = "batch"
summary = "the tokenizer has no pad token"
needs = ("tokenizer",)
remedy = "pad"
fix_on_warn = True


def check(ctx) -> list[Finding]:
    tok = ctx.tokenizer
    if tok.pad_id is not None:
        return []
    b = ctx.batch
    if b is not None and (b.input_ids.shape[0] == 1 or (b.attention_mask is not None and bool((b.attention_mask != 0).all()))):
        # nothing in the batch is padded (batch size 1, packing, equal lengths): no pad token is needed here
        return [Finding(
            id=id, severity="info", level=level,
            message=(f"{tok.class_name} has no pad token, but nothing in this batch is padded "
                     f"({'batch size 1' if b.input_ids.shape[0] == 1 else 'every position is attended: packed or equal-length rows'}); "
                     "it matters only if you batch rows of different lengths"),
            evidence={"tokenizer_class": tok.class_name, "batch_size": int(b.input_ids.shape[0]), "padded_positions": 0},
            fix="none needed for this script; before padding variable-length rows, add a pad token that is not eos",
        )]
    return [Finding(
        id=id, severity="warn", level=level,
        message=f"{tok.class_name} has no pad token (eos {tok.eos_token!r}, bos {token_ref(tok, tok.bos_id)['text']!r})",
        evidence={
            "tokenizer_class": tok.class_name,
            "name_or_path": tok.name_or_path,
            "eos": [token_ref(tok, i) for i in sorted(tok.eos_ids)],
            "bos": token_ref(tok, tok.bos_id) if tok.bos_id is not None else None,
            "special_tokens": [token_ref(tok, i) for i in sorted(tok.special_ids)[:16]],
            "vocab_len": tok.vocab_len,
        },
        fix=("give the tokenizer a pad token that is not eos: an existing unused special token (e.g. Llama-3's "
             "<|finetune_right_pad_id|>) or tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) followed by "
             "model.resize_token_embeddings(len(tokenizer)); then pad labels with -100 by position, not by id"),
    )]
