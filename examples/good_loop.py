"""A correct hand-written SFT loop on GSM8K: the incident loop with its bugs fixed.

  - labels are -100 on the prompt and on padding, so only the answer (and its EOS) is trained;
  - attention_mask is 0 only on padding;
  - fp32 weights (use bf16 autocast on a GPU that has it; never fp16 for a bf16 checkpoint).

It computes the loss itself (the model is called without labels), shifting by one: the logits
at position t predict the token at t + 1. `sftdoctor watch examples/good_loop.py` passes.
"""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from sftdoctor.tiny import tiny_model, train_tokenizer

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
IGNORE_INDEX = -100  # cross_entropy skips these targets

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--out", default=None, help="save the fine-tuned model here")
args = parser.parse_args()

with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(256), f)]

tokenizer = train_tokenizer([r["question"] + "\n" + r["answer"] for r in rows])
model = tiny_model("qwen2", len(tokenizer), dtype="bfloat16")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)


def collate(batch_rows):
    ids, labels = [], []
    for r in batch_rows:
        prompt = tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
        answer = tokenizer(" " + r["answer"] + tokenizer.eos_token)["input_ids"]
        ids.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    longest = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (longest - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids]),
        "labels": torch.tensor([y + [IGNORE_INDEX] * (longest - len(y)) for y in labels]),
    }


loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, shuffle=False, collate_fn=collate)
model.train()
for step, batch in enumerate(loader):
    if step == args.steps:
        break
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # logits[:, t] predicts token t + 1: drop the last logit and the first label
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step} loss {loss.item():.4f}")

if args.out:
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
