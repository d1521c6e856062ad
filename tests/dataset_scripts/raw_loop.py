"""A raw PyTorch loop whose first batch is clean but whose dataset is not: rows 20, 50, 80 of every
hundred lose their answer to truncation at MAX_LENGTH (3%), rows 60 of every hundred have no
supervised token (1%). `--healthy` builds the same rows without either defect.
Used by tests/test_dataset.py: `sftdoctor inspect-batch raw_loop.py --batches all` must name both."""
import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import AutoTokenizer

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[3] / "shared"))
MAX_LENGTH = 512
TRUNCATED = (20, 50, 80)  # row % 100: a long preamble pushes the answer past MAX_LENGTH
NO_SUPERVISION = (60,)  # row % 100: every label -100

parser = argparse.ArgumentParser()
parser.add_argument("--rows", type=int, default=400)
parser.add_argument("--healthy", action="store_true")
parser.add_argument("--raise-on-row", type=int, default=None, help="the collator raises on this row")
parser.add_argument("--infinite", action="store_true", help="an endless IterableDataset")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(args.rows), f)]


class GSM8K(Dataset):
    def __len__(self):
        return len(rows)

    def __getitem__(self, i):
        r = rows[i]
        prompt = tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
        if not args.healthy and i % 100 in TRUNCATED:  # a preamble of 500 - len(prompt) tokens: the answer cannot fit
            prompt = tokenizer(" Read")["input_ids"] * (500 - len(prompt)) + prompt
        answer = tokenizer(" " + r["answer"])["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:MAX_LENGTH]
        labels = ([-100] * len(prompt) + answer)[:MAX_LENGTH]
        if not args.healthy and i % 100 in NO_SUPERVISION:
            labels = [-100] * len(ids)
        return {"input_ids": ids, "labels": labels, "row": i}


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        ds, i = GSM8K(), 0
        while True:
            yield ds[i % len(ds)]
            i += 1


def collate(items):
    if args.raise_on_row is not None and any(it["row"] == args.raise_on_row for it in items):
        raise ValueError(f"cannot collate row {args.raise_on_row}")
    T = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), T), tokenizer.pad_token_id)
    labels = torch.full((len(items), T), -100)
    attn = torch.zeros((len(items), T), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n] = torch.tensor(it["input_ids"])
        labels[b, :n] = torch.tensor(it["labels"])
        attn[b, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


dataset = Endless() if args.infinite else GSM8K()
loader = DataLoader(dataset, batch_size=8, shuffle=not args.infinite, collate_fn=collate)

from sftdoctor.tiny import tiny_model  # noqa: E402

model = tiny_model("gpt2", len(tokenizer))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step, batch in enumerate(loader):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step == 2:
        break
