"""Pre-shifted labels given to a Hugging Face model, which shifts them again internally.

The collator builds `labels = input_ids[1:]` (the next token, as a hand-written loss would need)
and passes them to `model(..., labels=labels)`. HF *ForCausalLM shifts labels by one itself, so
position t is trained to predict token t + 2. The loss still goes down. sftdoctor reports
labels-misaligned.
"""
import argparse
import json
import os
from pathlib import Path

import torch

from sftdoctor.tiny import tiny_model, train_tokenizer

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8)
args = parser.parse_args()

with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(256), f)]

tokenizer = train_tokenizer([r["question"] + "\n" + r["answer"] for r in rows])
model = tiny_model("llama", len(tokenizer))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)


def collate(batch_rows):
    ids, labels = [], []
    for r in batch_rows:
        prompt = tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
        answer = tokenizer(" " + r["answer"] + tokenizer.eos_token)["input_ids"]
        full = prompt + answer
        target = [-100] * len(prompt) + answer
        ids.append(full)
        labels.append(target[1:] + [-100])  # "the label of token t is token t + 1"
    longest = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (longest - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (longest - len(y)) for y in labels]),
    }


loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=collate)
for step, batch in enumerate(loader):
    if step == args.steps:
        break
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step} loss {loss.item():.4f}")
