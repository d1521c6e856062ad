"""TRL SFTTrainer with a completion-only collator whose response template never matches.

TRL 0.20 removed DataCollatorForCompletionOnlyLM, so this script carries its own copy of the old
recipe: find the token ids of "### Answer:" in each row and supervise what follows. But Llama-2's
sentencepiece tokenizer encodes "### Answer:" alone as ['▁###', '▁Answer', ':'] and after a
newline as ['##', '#', '▁Answer', ':']: the template is never found, every label becomes -100,
and the loss is 0/0. sftdoctor reports labels-no-supervised-tokens.
"""
import argparse
import json
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from sftdoctor.tiny import tiny_model

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
RESPONSE_TEMPLATE = "### Answer:"

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--output-dir", default="out/trl_template_mismatch")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "llama2")
tokenizer.pad_token = tokenizer.unk_token
model = tiny_model("llama", len(tokenizer))

with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(64), f)]
texts = [{"text": f"### Question: {r['question']}\n{RESPONSE_TEMPLATE} {r['answer']}"} for r in rows]


class CompletionOnlyCollator:
    """Pads a batch and supervises only the tokens after the response template."""

    def __init__(self, tokenizer, response_template):
        self.tokenizer = tokenizer
        self.template_ids = tokenizer.encode(response_template, add_special_tokens=False)

    def __call__(self, examples):
        longest = max(len(e["input_ids"]) for e in examples)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(examples), longest), pad)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        labels = torch.full((len(examples), longest), -100)
        for i, example in enumerate(examples):
            ids = example["input_ids"]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            n = len(self.template_ids)
            for start in range(len(ids) - n + 1):
                if ids[start : start + n] == self.template_ids:
                    labels[i, start + n : len(ids)] = torch.tensor(ids[start + n :])
                    break
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


trainer = SFTTrainer(
    model=model,
    args=SFTConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=512,
    ),
    train_dataset=Dataset.from_list(texts),
    processing_class=tokenizer,
    data_collator=CompletionOnlyCollator(tokenizer, RESPONSE_TEMPLATE),
)
trainer.train()
