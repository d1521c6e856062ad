"""Did the script train on one prompt format and generate with another? (template-mismatch under
`watch`.) Training rows are the first batch's token rows; generation prompts are what the script
passes to model.generate. A chat row carries the template's role markers (special tokens other than
bos/eos/pad, e.g. <|im_start|>); a plain "Question: ... Answer:" row carries none. When one side has
them and the other does not, the fine-tune learned a format inference never shows it.

This module measures (which rows carry role markers); probes/template_mismatch.py judges.
"""
from __future__ import annotations

from typing import Any, Sequence

from .findings import Finding  # the type generation_format_mismatch returns; the probe builds it


def role_markers(tok: Any) -> set[int]:
    return set(tok.special_ids or ()) - set(tok.eos_ids or ()) - {tok.bos_id, tok.pad_id}


def is_chat(ids: Sequence[int], markers: set[int]) -> bool:
    return any(i in markers for i in ids)


def generation_format_mismatch(train_rows: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], tok: Any) -> Finding | None:
    """A template-mismatch finding when every training row and every prompt disagree on chat vs plain."""
    # lazy: the probe imports this module, so the registry cannot be imported at its top
    from sftdoctor.probes import template_mismatch

    return template_mismatch.judge_generation(train_rows, prompts, tok)
