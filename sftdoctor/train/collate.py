"""Turning question/answer rows into supervised token rows, and rows into padded batches.

A tokenized example (what a collator receives) is a dict:
    input_ids:     list[int]  prompt tokens then answer tokens (then EOS)
    labels:        list[int]  -100 on the prompt, the answer ids (and EOS) after it
    prompt_length: int        number of prompt tokens
    id:            int        the row id (for resume proofs and reports)
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch

from ..constants import IGNORE_INDEX



def plain_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def end_token_id(tokenizer: Any, prompt_format: str) -> int:
    """The token the model must learn to stop on: the chat template's end of turn in chat
    format (e.g. <|im_end|>), else the tokenizer's EOS."""
    if prompt_format == "chat":
        for text in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
            tid = tokenizer.convert_tokens_to_ids(text)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
                return tid
    return tokenizer.eos_token_id


def prompt_ids(tokenizer: Any, question: str, prompt_format: str) -> list[int]:
    """The prompt exactly as inference will send it (training and evaluation share this)."""
    if prompt_format == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(plain_prompt(question), add_special_tokens=True)["input_ids"]


def encode_example(tokenizer: Any, row: dict, *, prompt_format: str = "plain", mask_prompt: bool = True,
                   append_eos: bool = True) -> dict[str, Any]:
    prompt = prompt_ids(tokenizer, row["question"], prompt_format)
    # The answer is tokenized on its own, after a space, so the prompt/answer boundary is a
    # token boundary (no BOS: add_special_tokens=False).
    answer = tokenizer(" " + row["answer"] if prompt_format == "plain" else row["answer"], add_special_tokens=False)["input_ids"]
    if append_eos:
        answer = answer + [end_token_id(tokenizer, prompt_format)]  # supervised: the model learns to stop
    input_ids = prompt + answer
    # Labels are NOT shifted here: HF causal-LM models shift by one inside the loss
    # (logits[t] predicts labels[t+1]).
    labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else list(prompt)) + answer
    return {"input_ids": input_ids, "labels": labels, "prompt_length": len(prompt), "id": row["id"]}


def fit_length(examples: list[dict], max_length: int, overlong: str) -> tuple[list[dict], dict[str, int]]:
    """Rows longer than max_length: dropped and counted (default), or truncated (which cuts the
    answer; kept only to show what preflight refuses)."""
    kept, dropped, truncated = [], 0, 0
    for ex in examples:
        if len(ex["input_ids"]) <= max_length:
            kept.append(ex)
        elif overlong == "truncate":
            kept.append({**ex, "input_ids": ex["input_ids"][:max_length], "labels": ex["labels"][:max_length]})
            truncated += 1
        else:
            dropped += 1
    return kept, {"rows": len(examples), "dropped_overlong": dropped, "truncated": truncated}


class Collator:
    """Right padding to the longest row of the micro-batch (dynamic padding).

    Padding positions get attention_mask 0 and label -100 *by position*, so a pad id equal to
    the EOS id is safe here: the real EOS keeps its label.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        width = int(math.ceil(longest / self.multiple) * self.multiple)
        rows = len(features)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)  # padding carries no loss
        attention_mask = torch.zeros((rows, width), dtype=torch.long)  # 0 only on padding
        for r, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[r, :n] = torch.tensor(f["input_ids"])
            labels[r, :n] = torch.tensor(f["labels"])
            attention_mask[r, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackedCollator:
    """Padding-free batches: the micro-batch's rows concatenated into ONE row of sum(lengths)
    positions, no padding at all (positions computed per epoch == real tokens).

    Rows stay isolated because `position_ids` restart at 0 at each row's first token and no
    attention_mask is sent: transformers then builds a block-diagonal causal mask from the
    position ids (sdpa/eager) or varlen cu_seqlens (flash-attention), so no token attends to
    another row. This needs `model.config.use_cache = False` in training (with a cache the
    position ids are not read as packing) -- pipeline.py sets it.

    Labels: the HF loss shifts by one across the whole packed row, so the last token of row k
    would be scored against the first token of row k + 1; that first label is set to -100. In
    the padded layout that token is never a target either (labels[0] has no predecessor), so
    the loss and the gradients are the padded batch's exactly (tests/test_train_lean.py).
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for f in features:
            n = len(f["input_ids"])
            input_ids += list(f["input_ids"])
            labels += [IGNORE_INDEX] + list(f["labels"][1:])  # no target across the row boundary
            position_ids += range(n)  # restart at 0: the row boundary the attention obeys
        return {"input_ids": torch.tensor([input_ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([position_ids], dtype=torch.long)}


class WithExampleIds:
    """Wraps any collator so each batch also carries the row ids (popped before the forward)."""

    def __init__(self, collate: Callable[[list[dict]], dict]):
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = dict(self.collate(features))
        batch["example_ids"] = torch.tensor([f["id"] for f in features], dtype=torch.long)
        return batch


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Deterministic length-grouped order for (seed, epoch), in whole global batches.

    Shuffle, cut into mega-batches of `group` global batches, sort each mega-batch by length
    (longest first) and cut it into global batches, then shuffle the global batches. A global
    batch is batch_size x grad_accum x world_size rows, so one process with batch 2B and two
    processes with batch B get the same examples per optimizer step. The last incomplete global
    batch is dropped (a different one each epoch), so every rank sees whole steps.
    """

    def __init__(self, lengths: list[int], global_batch: int, seed: int, group: int = 16, shuffle: bool = True):
        self.lengths = lengths
        self.global_batch = global_batch
        self.seed = seed
        self.group = group
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls this at the start of each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.lengths) // self.global_batch) * self.global_batch

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        order = order[: len(self)]
        mega = self.global_batch * self.group
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[k:k + self.global_batch] for k in range(0, len(chunk), self.global_batch)]
        if self.shuffle:
            rng.shuffle(batches)
        for b in batches:
            yield from b
