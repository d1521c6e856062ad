"""Did the script train on one prompt format and generate with another? (template-mismatch under
`watch`.) Training rows are the first batch's token rows; generation prompts are what the script
passes to model.generate. A chat row carries the template's role markers (special tokens other than
bos/eos/pad, e.g. <|im_start|>); a plain "Question: ... Answer:" row carries none. When one side has
them and the other does not, the fine-tune learned a format inference never shows it.
"""
from __future__ import annotations

from typing import Any, Sequence

from .findings import Finding


def _markers(tok: Any) -> set[int]:
    return set(tok.special_ids or ()) - set(tok.eos_ids or ()) - {tok.bos_id, tok.pad_id}


def _is_chat(ids: Sequence[int], markers: set[int]) -> bool:
    return any(i in markers for i in ids)


def generation_format_mismatch(train_rows: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], tok: Any) -> Finding | None:
    """A template-mismatch finding when every training row and every prompt disagree on chat vs plain."""
    markers = _markers(tok)
    if not markers or not train_rows or not prompts:
        return None
    train_chat = [_is_chat(r, markers) for r in train_rows]
    prompt_chat = [_is_chat(p, markers) for p in prompts]
    if len(set(train_chat)) != 1 or len(set(prompt_chat)) != 1 or train_chat[0] == prompt_chat[0]:
        return None  # mixed, or the same format on both sides
    trained, generated = ("chat template", "plain text") if train_chat[0] else ("plain text", "chat template")
    seen = sorted({i for p in (train_rows if train_chat[0] else prompts) for i in p if i in markers})[:4]
    return Finding(
        id="template-mismatch", severity="warn", level="run",
        message=(f"the model was trained on {trained} rows but generate() is given {generated} prompts: it is asked in "
                 "a format it never saw in training"),
        evidence={"where": "generate", "training_format": trained, "generation_format": generated,
                  "role_markers": [{"id": i, "text": tok.token_text(i)} for i in seen],
                  "training_rows": len(train_rows), "prompts": len(prompts)},
        fix=("build the generation prompt exactly as the training rows were built (the same prompt function, or "
             "apply_chat_template(..., add_generation_prompt=True) in both places)"),
    )
