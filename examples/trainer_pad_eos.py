"""HF Trainer with the textbook GPT-2 setup `tokenizer.pad_token = tokenizer.eos_token` and the
standard causal-LM collator, which masks labels by token id (labels[labels == pad_id] = -100).

With pad == eos that masks every real EOS too: the model never learns to stop generating.
sftdoctor reports pad-is-eos-masked.
"""
import argparse
import json
import os
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

from sftdoctor.tiny import tiny_model

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--output-dir", default="out/trainer_pad_eos")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token
model = tiny_model("gpt2", len(tokenizer))

with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(64), f)]


def tokenize(row):
    text = f"Question: {row['question']}\nAnswer: {row['answer']}{tokenizer.eos_token}"
    return tokenizer(text, truncation=True, max_length=256)


train_dataset = Dataset.from_list(rows).map(tokenize, remove_columns=["question", "answer"])
trainer = Trainer(
    model=model,
    args=TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
    ),
    train_dataset=train_dataset,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),  # labels[labels == pad_id] = -100
)
trainer.train()
