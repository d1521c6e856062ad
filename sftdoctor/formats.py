"""Did the script train on one prompt format and generate with another? (template-mismatch under
`watch`.) Training rows are the first batch's token rows; generation prompts are what the script
passes to model.generate. A chat row carries the template's role markers (special tokens other than
bos/eos/pad, e.g. <|im_start|>); a plain "Question: ... Answer:" row carries none. When one side has
them and the other does not, the fine-tune learned a format inference never shows it.

This module measures (which rows carry role markers); probes/template_mismatch.py judges
(sftdoctor.outputs joins the two for `watch`).
"""
from __future__ import annotations

from typing import Any, Sequence



def role_markers(tok: Any) -> set[int]:
    return set(tok.special_ids or ()) - set(tok.eos_ids or ()) - {tok.bos_id, tok.pad_id}


def is_chat(ids: Sequence[int], markers: set[int]) -> bool:
    return any(i in markers for i in ids)
