"""Shared fixtures: real tokenizers from ../shared/tokenizers, GSM8K rows from ../shared/data,
and a correct completion-only batch builder that every "healthy" fixture starts from."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # two shared cores: one thread is faster than two (probe-overhead-anchors.md)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", REPO.parent / "shared"))
TOKENIZERS = SHARED / "tokenizers"
GSM8K = SHARED / "data" / "gsm8k"
FAMILIES = ["qwen2.5", "gpt2", "llama3.2", "llama2", "mistral", "phi3", "gemma2"]


@lru_cache(maxsize=None)
def tokenizer(family: str):
    """A real tokenizer from ../shared/tokenizers; families without a pad get pad = eos? No:
    they are returned as shipped. Use `with_pad` for a training-ready one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZERS / family))


def with_pad(family: str):
    """A copy of the tokenizer with a pad token that is *not* eos (the correct choice)."""
    import copy

    tok = copy.deepcopy(tokenizer(family))
    if tok.pad_token is None:
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = "right"
    return tok


@lru_cache(maxsize=None)
def gsm8k_rows(split: str = "train", n: int = 64) -> tuple[dict, ...]:
    rows = []
    with open(GSM8K / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return tuple(rows)


def prompt_text(q: str) -> str:
    return f"Question: {q}\nAnswer:"


def completion_batch(tok, rows, *, max_length: int | None = None, eos: bool = True):
    """The correct completion-only batch: prompt -100, answer + EOS supervised, pad -100,
    right padding, attention_mask 0 only on padding."""
    feats = []
    for r in rows:
        p = tok(prompt_text(r["question"]), add_special_tokens=True)["input_ids"]
        a = tok(" " + r["answer"], add_special_tokens=False)["input_ids"]
        if eos:
            a = a + [tok.eos_token_id]
        ids = (p + a)[:max_length] if max_length else p + a
        labels = ([-100] * len(p) + a)[: len(ids)]
        feats.append((ids, labels))
    return pad_right(tok.pad_token_id, feats)


def pad_right(pad_id: int, feats):
    """Collate (ids, labels) pairs with right padding: pad ids, labels -100 and attention 0 on padding."""
    T = max(len(i) for i, _ in feats)
    input_ids = torch.full((len(feats), T), pad_id, dtype=torch.long)
    labels = torch.full((len(feats), T), -100, dtype=torch.long)
    attn = torch.zeros((len(feats), T), dtype=torch.long)
    for b, (ids, lab) in enumerate(feats):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        attn[b, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: on a machine without one they are skipped, with the reason shown."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
