"""The motivating incident's batch code, as a user collator for `sftdoctor train --collator`.

    sftdoctor train --collator examples.incident_collator:collate --fix --max-steps 30   # from the repository root
    sftdoctor train --model Qwen/Qwen2.5-0.5B --data openai/gsm8k --collator examples.incident_collator:collate --dtype float16   # GPU

A collator takes the tokenized examples (dicts with `input_ids`, `labels`, `prompt_length`) and
returns the batch dict the model is called with. Two bugs from the hand-written loop, kept on
purpose (the tests use this file as the incident's fixture):
- labels are input_ids padded with 0 instead of -100 (id 0 is `!` in Qwen/GPT-2 vocabularies),
  so padding becomes a training target;
- the loss mask (1 on answer tokens) is returned as attention_mask, so the answer cannot see
  the question.
"""
from __future__ import annotations

import torch

PAD = 0  # the incident padded everything with 0


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    input_ids, labels, loss_mask = [], [], []
    for f in features:
        ids = list(f["input_ids"])
        pad = width - len(ids)
        input_ids.append(ids + [PAD] * pad)
        labels.append(ids + [PAD] * pad)  # BUG: padded labels are 0, not -100
        answer = len(ids) - f["prompt_length"]
        loss_mask.append([0] * f["prompt_length"] + [1] * answer + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(loss_mask),  # BUG: the loss mask passed as attention_mask
    }
