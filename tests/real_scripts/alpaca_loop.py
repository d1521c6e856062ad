"""A course-style custom loop, Alpaca style: the Llama-2 tokenizer gets a new [PAD] token and the
model's embeddings are resized; the model is called WITHOUT labels and the loss is the script's own.

  --variant mask      correct: the batch holds a response mask; the loss shifts internally
                      (logits[:, :-1] against input_ids[:, 1:], masked by the response mask)
  --variant preshift  correct: the collator pre-shifts the labels (labels[t] = input_ids[t+1]) and
                      the loss scores logits[t] against labels[t] with no second shift
  --variant double    broken: pre-shifted labels AND a second shift in the loss (t -> t+2)
  --accum N           gradient accumulation over N micro-batches (loss / N), logging the step loss
"""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[3] / "shared"))
p = argparse.ArgumentParser()
p.add_argument("--variant", default="mask", choices=["mask", "preshift", "double"])
p.add_argument("--steps", type=int, default=3)
p.add_argument("--accum", type=int, default=1)
p.add_argument("--batch-size", type=int, default=2)
args = p.parse_args()
torch.manual_seed(0)

tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "llama2"))
tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # Alpaca: a new pad token, id 32000
tokenizer.padding_side = "right"
config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                     bos_token_id=1, eos_token_id=2)
model = LlamaForCausalLM(config)
model.resize_token_embeddings(len(tokenizer))  # 32001 rows: the new [PAD] has its own row
model.config.pad_token_id = tokenizer.pad_token_id
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(32), f)]


def collate(batch_rows):
    ids, masks = [], []
    for r in batch_rows:
        prompt = tokenizer(f"### Instruction:\n{r['question']}\n\n### Response:\n")["input_ids"]
        answer = tokenizer(r["answer"][:200], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    T = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (T - len(x)) for x in ids])
    attention = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])
    response = torch.tensor([m + [0] * (T - len(m)) for m in masks])
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if args.variant == "mask":
        batch["response_mask"] = response
    else:  # pre-shifted targets for a loss without its own shift: labels[t] = input_ids[t + 1]
        labels = torch.full_like(input_ids, -100)
        labels[:, :-1] = torch.where(response[:, 1:].bool(), input_ids[:, 1:], -100)
        batch["labels"] = labels
    return batch


def loss_fn(logits, batch):
    if args.variant == "mask":
        logits, targets = logits[:, :-1], batch["input_ids"][:, 1:]
        mask = batch["response_mask"][:, 1:].float()
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        return (per_token * mask.flatten()).sum() / mask.sum()
    labels = batch["labels"]
    if args.variant == "double":  # BUG: the labels are already shifted; this shifts them again
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, collate_fn=collate)
model.train()
step, micro, logged = 0, 0, 0.0
for batch in loader:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = loss_fn(logits, batch) / args.accum
    loss.backward()
    logged += loss.item()
    micro += 1
    if micro % args.accum == 0:
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step} loss {logged:.4f}")
        step, logged = step + 1, 0.0
        if step == args.steps:
            break
