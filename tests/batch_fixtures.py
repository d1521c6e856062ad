"""Broken and healthy batches for the batch-level probes, built from real tokenizers and GSM8K.

Every builder starts from a correct batch (conftest.completion_batch or chat_batch below) and
applies the one mistake its probe must find, the way user code makes it.
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch

from conftest import completion_batch, gsm8k_rows, pad_right, prompt_text, tokenizer, with_pad  # noqa: F401 (re-exported)

IGNORE = -100


def rows(n: int = 4):
    return gsm8k_rows("train", 8)[:n]


@lru_cache(maxsize=None)
def padded(family: str):
    """conftest.with_pad, copied once per family (the fixtures never modify a tokenizer)."""
    return with_pad(family)


def healthy(family: str, n: int = 4):
    tok = padded(family)
    return tok, completion_batch(tok, rows(n))


def pad_is_eos_tokenizer(family: str = "gpt2"):
    """The common recipe tokenizer.pad_token = tokenizer.eos_token."""
    tok = copy.deepcopy(tokenizer(family))
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def incident():
    """The `!!!!` incident (Qwen2.5): labels padded with 0 instead of -100, and the loss mask
    passed as attention_mask (0 on the prompt and on padding)."""
    tok, b = healthy("qwen2.5")
    loss_mask = (b["labels"] != IGNORE).long()
    padding = b["attention_mask"] == 0
    labels = b["labels"].clone()
    labels[padding] = 0  # F.pad(labels, ..., value=0)
    return tok, {"input_ids": b["input_ids"], "attention_mask": loss_mask, "labels": labels}


def incident_without_pad_id():
    """The same mistakes with GPT-2 as shipped (no pad token; the collator pads with eos)."""
    tok = pad_is_eos_tokenizer("gpt2")
    b = completion_batch(tok, rows())
    loss_mask = (b["labels"] != IGNORE).long()
    return tokenizer("gpt2"), {"input_ids": b["input_ids"], "attention_mask": loss_mask, "labels": b["labels"]}


def pre_shifted(family: str = "gpt2"):
    """labels[t] = input_ids[t+1]: shifted by the user, then again inside the HF model."""
    tok, b = healthy(family)
    labels = torch.full_like(b["labels"], IGNORE)
    labels[:, :-1] = b["labels"][:, 1:]
    return tok, {**b, "labels": labels}


def masked_by_id(family: str = "gpt2"):
    """pad = eos, then labels[input_ids == pad_id] = -100: the answer's EOS is masked too."""
    tok = pad_is_eos_tokenizer(family)
    b = completion_batch(tok, rows())
    labels = b["labels"].clone()
    labels[b["input_ids"] == tok.pad_token_id] = IGNORE
    return tok, {**b, "labels": labels}


def prompt_supervised(family: str = "llama3.2"):
    """labels = input_ids on every real token (no completion-only masking)."""
    tok, b = healthy(family)
    labels = torch.where(b["attention_mask"] == 1, b["input_ids"], torch.full_like(b["input_ids"], IGNORE))
    return tok, {**b, "labels": labels}


def chat_batch(tok, rows, *, supervise_prompt: bool = False, add_special_tokens: bool = False):
    """Chat-template rows: the assistant turn (with its end-of-turn token) supervised, right padding."""
    feats = []
    for r in rows:
        msgs = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        head = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        n_head = len(tok(head, add_special_tokens=add_special_tokens)["input_ids"])
        ids = tok(full, add_special_tokens=add_special_tokens)["input_ids"]
        labels = list(ids) if supervise_prompt else [IGNORE] * n_head + ids[n_head:]
        feats.append((ids, labels))
    return pad_right(tok.pad_token_id, feats)


def chat_examples(rows):
    return [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def left_padded(family: str = "llama2", *, position_ids: str | None = None):
    """The healthy batch moved to left padding; position_ids: None, 'arange' or 'cumsum'."""
    tok, b = healthy(family)
    out = {k: torch.zeros_like(v) for k, v in b.items()}
    out["input_ids"][:] = tok.pad_token_id
    out["labels"][:] = IGNORE
    T = b["input_ids"].shape[1]
    for r in range(b["input_ids"].shape[0]):
        n = int(b["attention_mask"][r].sum())
        for k in b:
            out[k][r, T - n:] = b[k][r, :n]
    if position_ids == "arange":
        out["position_ids"] = torch.arange(T).expand(out["input_ids"].shape[0], T).clone()
    elif position_ids == "cumsum":
        out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return tok, out


def packed(family: str = "llama3.2", *, docs: int = 3, reset_positions: bool = False, drop_reset: bool = False):
    """GSM8K documents concatenated into rows (each prompt + answer + EOS, BOS where the
    tokenizer adds one), no padding; optionally with position ids restarting per document."""
    tok = padded(family)
    one = completion_batch(tok, rows(2 * docs))
    row_ids, row_labels, row_pos = [], [], []
    for start in (0, docs):
        ids, labels, pos = [], [], []
        for r in range(start, start + docs):
            n = int(one["attention_mask"][r].sum())
            ids += one["input_ids"][r, :n].tolist()
            labels += one["labels"][r, :n].tolist()
            pos += list(range(n))
        row_ids.append(ids)
        row_labels.append(labels)
        row_pos.append(pos)
    T = min(len(i) for i in row_ids)  # cut both rows to one width (the packer's block size)
    out = {
        "input_ids": torch.tensor([i[:T] for i in row_ids]),
        "attention_mask": torch.ones(2, T, dtype=torch.long),
        "labels": torch.tensor([lab[:T] for lab in row_labels]),
    }
    if reset_positions:
        pos = torch.tensor([p[:T] for p in row_pos])
        if drop_reset:  # the packer forgot the restart of the last document of row 0
            z = (pos[0] == 0).nonzero().flatten()[-1]
            pos[0, z:] = pos[0, z - 1] + 1 + torch.arange(T - int(z))
        out["position_ids"] = pos
    return tok, out


def truncated(family: str = "qwen2.5", max_length: int = 120, *, keep_eos: bool = False):
    """Rows cut at max_length (TRL keep_start): the end of the answer and its EOS are gone;
    keep_eos re-appends the EOS after the cut, so only the #### line is lost."""
    tok = padded(family)
    b = completion_batch(tok, rows(), max_length=max_length)
    if keep_eos:
        full = b["attention_mask"].sum(dim=1) == max_length
        b["input_ids"][full, max_length - 1] = tok.eos_token_id
        b["labels"][full, max_length - 1] = tok.eos_token_id
    return tok, b
