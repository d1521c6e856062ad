"""A raw loop whose first batches are clean; batch 4 (rows 16-19) has its padding labelled 0
instead of -100 (`--healthy`: never). `sftdoctor watch` must name it although the first batch is clean."""
import argparse
import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from sftdoctor.tiny import tiny_model

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[3] / "shared"))
parser = argparse.ArgumentParser()
parser.add_argument("--healthy", action="store_true")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(24), f)]


def collate(chunk, bad):
    feats = []
    for r in chunk:
        p = tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
        a = tokenizer(" " + r["answer"])["input_ids"] + [tokenizer.eos_token_id]
        feats.append((p + a, [-100] * len(p) + a))
    T = max(len(i) for i, _ in feats)
    ids = torch.full((len(feats), T), tokenizer.pad_token_id)
    labels = torch.full((len(feats), T), 0 if bad else -100)  # the bug: padding labelled 0
    attn = torch.zeros((len(feats), T), dtype=torch.long)
    for b, (i, lab) in enumerate(feats):
        ids[b, :len(i)], labels[b, :len(lab)], attn[b, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


model = tiny_model("gpt2", len(tokenizer), hidden=32, layers=1)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(6):
    batch = collate(rows[4 * step:4 * step + 4], bad=step == 4 and not args.healthy)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
