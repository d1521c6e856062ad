"""The incident: a hand-written SFT loop on GSM8K whose saved model prints only `!!!!`.

It carries the three bugs of the original loop (run `sftdoctor watch examples/incident_loop.py`):
  - labels padded with 0 instead of -100: the model is trained to emit token 0 after every answer;
  - the loss mask passed as attention_mask: the answer tokens cannot see the question;
  - fp16 weights for a model whose checkpoint is bf16, optimised by AdamW with eps=1e-8, which
    rounds to 0 in fp16: weights turn NaN after the first step, and argmax of NaN logits is id 0.

Tiny random model and a tokenizer trained here, so it runs in seconds on a CPU.
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
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--out", "--output-dir", dest="out", default=None, help="save the fine-tuned model here")
parser.add_argument("--save-batch", default=None, help="torch.save the first batch here (for sftdoctor inspect-batch --batch)")
args = parser.parse_args()

with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(256), f)]

tokenizer = train_tokenizer([r["question"] + "\n" + r["answer"] for r in rows])
model = tiny_model("qwen2", len(tokenizer), dtype="bfloat16")  # the checkpoint's config says bfloat16
model = model.half()  # "fp16 halves the memory"
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)


def collate(batch_rows):
    ids, loss_masks = [], []
    for r in batch_rows:
        prompt = tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
        answer = tokenizer(" " + r["answer"] + tokenizer.eos_token)["input_ids"]
        ids.append(prompt + answer)
        loss_masks.append([0] * len(prompt) + [1] * len(answer))
    longest = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (longest - len(x)) for x in ids]),
        "labels": torch.tensor([x + [0] * (longest - len(x)) for x in ids]),  # padded with 0, not -100
        "loss_mask": torch.tensor([m + [0] * (longest - len(m)) for m in loss_masks]),
    }


loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, shuffle=False, collate_fn=collate)
model.train()
for step, batch in enumerate(loader):
    if step == args.steps:
        break
    if step == 0 and args.save_batch:
        torch.save(batch, args.save_batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["loss_mask"], labels=batch["labels"])
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step} loss {out.loss.item():.4f}")

model.eval()
prompt = tokenizer(f"Question: {rows[0]['question']}\nAnswer:", return_tensors="pt")
with torch.no_grad():
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print("sample:", repr(tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:])))
if args.out:
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
