"""Fixtures for the step-probe tests: a small real BPE tokenizer trained on GSM8K text, tiny random
models, correct and broken losses of the kinds users write in their own loops."""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from conftest import gsm8k_rows
from sftdoctor.tiny import tiny_model, train_tokenizer

IGNORE = -100


@lru_cache(maxsize=None)
def small_tok():
    """A byte-level BPE tokenizer (vocab 512, pad distinct from eos) trained on GSM8K rows."""
    rows = gsm8k_rows("train", 64)
    return train_tokenizer([r["question"] + " " + r["answer"] for r in rows], vocab_size=512)


def batch(tok=None, n: int = 4, start: int = 0, max_length: int = 64):
    """A correct completion-only batch (prompt -100, answer + EOS supervised, pad -100, right
    padding) from GSM8K rows cut short: prompt and answer each at most max_length // 2 tokens,
    answers of different lengths so rows carry padding."""
    tok = tok or small_tok()
    rows = gsm8k_rows("train", start + n)[start:start + n]
    half = max_length // 2
    feats = []
    for i, r in enumerate(rows):
        p = tok("Question: " + r["question"], add_special_tokens=False)["input_ids"][:half]
        a = tok(" Answer: " + r["answer"], add_special_tokens=False)["input_ids"][: half - 1 - 3 * (i % 4)]
        feats.append((p + a + [tok.eos_token_id], [IGNORE] * len(p) + a + [tok.eos_token_id]))
    T = max(len(x) for x, _ in feats)
    input_ids = torch.full((n, T), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((n, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((n, T), dtype=torch.long)
    for b, (ids, lab) in enumerate(feats):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        attn[b, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


def model(arch: str = "qwen2", tok=None, **kw):
    tok = tok or small_tok()
    kw.setdefault("hidden", 32)
    return tiny_model(arch, vocab_size=len(tok), **kw)


def ce(logits, targets):
    """Mean cross-entropy of logits [B, T', V] against targets [B, T'] (-100 ignored), in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def correct_loss(logits, labels):
    """The right custom loss: logits[t] against labels[t + 1], once."""
    return ce(logits[:, :-1], labels[:, 1:])


def double_shift_loss(logits, labels):
    """Labels pre-shifted by the dataset AND shifted again in the loss: logits[t] vs input[t + 2]."""
    pre = torch.full_like(labels, IGNORE)
    pre[:, :-1] = labels[:, 1:]
    return ce(logits[:, :-1], pre[:, 1:])


def pad_with(labels, attention_mask, value: int):
    """Labels whose padding carries `value` (0 or the pad id) instead of -100."""
    out = labels.clone()
    out[attention_mask == 0] = value
    return out


def custom_step(m, b, loss_fn, opt=None, *, labels=None, attention_mask=None):
    """One step of a hand-written loop: NO labels given to the model."""
    out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"] if attention_mask is None else attention_mask)
    loss = loss_fn(out.logits, b["labels"] if labels is None else labels)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad()
    return loss


def hf_step(m, b, opt=None, *, scale: float = 1.0):
    out = m(**b)
    (out.loss * scale).backward()
    if opt is not None:
        opt.step()
        opt.zero_grad()
    return out.loss


def scale_module(module, factor: float):
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(factor)


def boost_mlp(mlp, down: float, up: float = 1000.0):
    """Scale an MLP so its output grows by up * down while every weight stays small enough for fp16."""
    proj = getattr(mlp, "up_proj", None) or mlp.c_fc
    scale_module(proj, up)
    scale_module(getattr(mlp, "down_proj", None) or mlp.c_proj, down)
