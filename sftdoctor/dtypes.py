"""Dtype names as users type them: every verb accepts both spellings (fp16 / float16,
bf16 / bfloat16, fp32 / float32), whatever spelling the verb uses inside."""
from __future__ import annotations

# one entry per accepted spelling -> torch's name
_CANONICAL = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def long_name(value: str) -> str:
    """`fp16` -> `float16`; anything unknown (`auto`, a typo) comes back unchanged for the
    caller's own choices check to reject with the list of what is accepted."""
    key = str(value).strip().lower().removeprefix("torch.")
    return _CANONICAL.get(key, value)


def short_name(value: str) -> str:
    """`float16` -> `fp16` (train's recipe spelling); unknown values unchanged."""
    long = long_name(value)
    return _SHORT.get(long, value)


SPELLINGS = "fp32/float32, bf16/bfloat16, fp16/float16"
