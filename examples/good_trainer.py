"""A correct HF Trainer SFT on GSM8K: a pad token distinct from EOS, the prompt masked with -100,
the answer and its EOS supervised, padding masked with -100 by DataCollatorForSeq2Seq.
`sftdoctor watch examples/good_trainer.py` passes.
"""
import argparse
import json
import os
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from sftdoctor.tiny import tiny_model

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
IGNORE_INDEX = -100

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--output-dir", default="out/good_trainer")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
tokenizer.add_special_tokens({"pad_token": "<|pad|>"})  # a pad that is not EOS
model = tiny_model("gpt2", len(tokenizer))  # embeddings sized to the tokenizer, pad included

with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(64), f)]


def tokenize(row):
    prompt = tokenizer(f"Question: {row['question']}\nAnswer:")["input_ids"]
    answer = tokenizer(" " + row["answer"])["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [IGNORE_INDEX] * len(prompt) + answer}


train_dataset = Dataset.from_list(rows).map(tokenize, remove_columns=["question", "answer"])
trainer = Trainer(
    model=model,
    args=TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
    ),
    train_dataset=train_dataset,
    data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
)
trainer.train()
trainer.save_model(args.output_dir)
