"""A row that starts with two BOS tokens: the chat template already wrote one and
tokenizer(text) added another (add_special_tokens=True on rendered template text)."""
from __future__ import annotations

from sftdoctor.findings import Finding

from ._dataset import DatasetRule
from ._common import first_index, real_mask, rows_of, token_ref

id = "bos-duplicated"
level = "batch"
summary = "a row starts with two BOS tokens (chat template plus add_special_tokens)"
needs = ("tokenizer",)
remedy = None

dataset = DatasetRule(count="rows_doubled", what="start with two BOS tokens")


def check(ctx) -> list[Finding]:
    b, tok = ctx.batch, ctx.tokenizer
    if tok.bos_id is None or b.input_ids.shape[1] < 2:
        return []
    real = real_mask(ctx)
    first = first_index(real).clamp(min=0)  # left padding: the row starts at its first real token
    second = (first + 1).clamp(max=b.input_ids.shape[1] - 1)
    ids = b.input_ids
    doubled = (ids.gather(1, first.unsqueeze(1)).squeeze(1) == tok.bos_id) \
        & (ids.gather(1, second.unsqueeze(1)).squeeze(1) == tok.bos_id) \
        & real.gather(1, second.unsqueeze(1)).squeeze(1) & (first + 1 < ids.shape[1])
    n = int(doubled.sum())
    if n == 0:
        return []
    return [Finding(
        id=id, severity="warn", level=level,
        message=f"{n} of {ids.shape[0]} rows start with two BOS tokens {token_ref(tok, tok.bos_id)['text']!r}",
        evidence={"rows": rows_of(doubled), "rows_doubled": n, "bos": token_ref(tok, tok.bos_id),
                  "tokenizer_adds_bos": tok.add_bos},
        fix=("tokenize chat-template text with add_special_tokens=False (the template already writes BOS), or let "
             "apply_chat_template(messages, tokenize=True) produce the ids"),
    )]
