"""A loop whose optimizer holds almost none of the model: the weights never train.

The parameter groups (weight decay on matrices, none on norms and biases) were copied from a
GPT-2 script, whose names are c_attn / c_fc / c_proj / ln_1. This is a Qwen2 model (q_proj,
gate_proj, input_layernorm ...): only the attention biases match, so the optimizer updates a few
hundred numbers and the rest of the model keeps its initial weights. The loss creeps down a
little, which hides it. sftdoctor reports params-frozen (trainable parameters missing from the
optimizer).
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
model = tiny_model("qwen2", len(tokenizer))

decay = [p for n, p in model.named_parameters() if n.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight"))]
no_decay = [p for n, p in model.named_parameters() if ".ln_" in n or n.endswith(".bias")]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)


def collate(batch_rows):
    ids, labels = [], []
    for r in batch_rows:
        prompt = tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
        answer = tokenizer(" " + r["answer"] + tokenizer.eos_token)["input_ids"]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
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
