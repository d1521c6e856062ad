"""Training rows must be what the tokenizer's chat template (the inference format) produces for
the same example; otherwise the fine-tune learns a format that inference never shows it.

Needs hints.examples: the raw example of each row, {"messages": [...]} or
{"prompt": str, "response": str}. Without a chat template a prompt/response example is expected
as tokenizer(prompt + response) with the tokenizer's own special tokens."""
from __future__ import annotations

from typing import Any, Sequence

from sftdoctor.findings import Finding
from sftdoctor.formats import is_chat, role_markers

from ._dataset import DatasetRule
from ._common import real_mask, token_ref

id = "template-mismatch"
level = "batch"
summary = "training rows differ from what the chat template produces for the same example"
needs = ("tokenizer", "examples")
family = "learned"
priority = 19
cause = "Training rows and inference prompts use different formats."
remedy = None

MAX_ROWS = 16  # rendering is a Python call per row: compare at most this many
CONTEXT = 4  # tokens shown before the first difference


def expected_ids(tok, example) -> list[int] | None:
    """What the inference format produces for one raw example (None when it cannot say)."""
    if not isinstance(example, dict):
        return None
    messages = example.get("messages")
    if messages is None and "prompt" in example and "response" in example:
        if not tok.chat_template:
            return tok.encode(example["prompt"] + example["response"], add_special_tokens=True)
        messages = [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["response"]}]
    if not messages or tok.apply_chat_template is None or not tok.chat_template:
        return None
    text = tok.apply_chat_template(messages, tokenize=False)
    # the rendered text already holds the template's special tokens (BOS included): add none
    return tok.encode(text, add_special_tokens=False)


def _trailing_ok(extra: list[int], tok) -> bool:
    """A tail only one side has is fine when it is end tokens / whitespace (EOS appended by the
    collator, the template's final newline)."""
    for i in extra:
        if i in tok.eos_ids:
            continue
        if tok.decode is not None and tok.decode([i]).strip() == "":
            continue
        return False
    return True

dataset = DatasetRule(count="rows_mismatched", what="differ from the chat template / prompt format")


def check(ctx) -> list[Finding]:
    tok, b = ctx.tokenizer, ctx.batch
    examples = list(ctx.hints.examples or [])
    real = real_mask(ctx)
    compared, mismatched, first = 0, [], None
    for r in range(min(len(examples), b.input_ids.shape[0], MAX_ROWS)):
        try:
            want = expected_ids(tok, examples[r])
        except Exception:
            want = None
        if want is None:
            continue
        got = b.input_ids[r][real[r]].tolist()
        compared += 1
        n = min(len(got), len(want))
        diff = next((i for i in range(n) if got[i] != want[i]), None)
        if diff is None:
            if _trailing_ok(got[n:], tok) and _trailing_ok(want[n:], tok):
                continue
            diff = n
        mismatched.append(r)
        if first is None:
            first = {
                "row": r,
                "token_index": diff,
                "got": token_ref(tok, got[diff]) if diff < len(got) else None,
                "expected": token_ref(tok, want[diff]) if diff < len(want) else None,
                "before": [token_ref(tok, i) for i in got[max(0, diff - CONTEXT):diff]],
                "got_length": len(got),
                "expected_length": len(want),
            }
    if not mismatched:
        return []
    g = first["got"]["text"] if first["got"] else "<end of row>"
    e = first["expected"]["text"] if first["expected"] else "<end of template>"
    return [Finding(
        id=id, severity="warn", level=level,
        message=(f"{len(mismatched)} of {compared} rows differ from the chat template's rendering of their example; "
                 f"first at row {first['row']} token {first['token_index']}: got {g!r}, template gives {e!r}"),
        evidence={"rows_compared": compared, "rows_mismatched": len(mismatched), "rows": mismatched,
                  "first_difference": first, "has_chat_template": bool(tok.chat_template)},
        fix=("build training rows with tokenizer.apply_chat_template(messages) (tokenize=True, or tokenize the "
             "rendered text with add_special_tokens=False) and use the same call at inference"),
    )]


def judge_generation(train_rows: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]], tok: Any) -> Finding | None:
    """The same id for a second view of the mismatch (what `watch` sees): every training row is in
    one format (chat: role markers; plain: none) and every prompt given to model.generate in the other."""
    markers = role_markers(tok)
    if not markers or not train_rows or not prompts:
        return None
    train_chat = [is_chat(r, markers) for r in train_rows]
    prompt_chat = [is_chat(p, markers) for p in prompts]
    if len(set(train_chat)) != 1 or len(set(prompt_chat)) != 1 or train_chat[0] == prompt_chat[0]:
        return None  # mixed, or the same format on both sides
    trained, generated = ("chat template", "plain text") if train_chat[0] else ("plain text", "chat template")
    seen = sorted({i for p in (train_rows if train_chat[0] else prompts) for i in p if i in markers})[:4]
    return Finding(
        id=id, severity="warn", level="run",
        message=(f"the model was trained on {trained} rows but generate() is given {generated} prompts: it is asked in "
                 "a format it never saw in training"),
        evidence={"where": "generate", "training_format": trained, "generation_format": generated,
                  "role_markers": [{"id": i, "text": tok.token_text(i)} for i in seen],
                  "training_rows": len(train_rows), "prompts": len(prompts)},
        fix=("build the generation prompt exactly as the training rows were built (the same prompt function, or "
             "apply_chat_template(..., add_generation_prompt=True) in both places)"),
    )
