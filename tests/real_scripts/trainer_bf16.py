"""HF Trainer with bf16=True on the CPU (accelerate wraps the forward: autocast + an fp32 copy of
the logits), a Trainer built WITHOUT processing_class (the tokenizer lives in the data collator).

  --variant correct   the Trainer's own loss (labels -100 on prompt and padding)
  --variant ignored   broken: a custom compute_loss that scores every position against input_ids,
                      -100 positions (prompt AND padding) included; the labels given to the model are
                      right, so only the gradient shows the bug
"""
import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, Qwen2Config, Qwen2ForCausalLM, Trainer,
                          TrainingArguments)

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[3] / "shared"))
p = argparse.ArgumentParser()
p.add_argument("--variant", default="correct", choices=["correct", "ignored"])
p.add_argument("--steps", type=int, default=3)
p.add_argument("--accum", type=int, default=1)
args = p.parse_args()
torch.manual_seed(0)

tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "qwen2.5"))
tok.pad_token = "<|endoftext|>"  # distinct from EOS <|im_end|>
tok.eos_token = "<|im_end|>"
config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     tie_word_embeddings=True)
model = Qwen2ForCausalLM(config)

with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(16), f)]
features = []
for r in rows:
    prompt = tok(f"Question: {r['question']}\nAnswer:")["input_ids"]
    answer = tok(" " + r["answer"][:160], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    features.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})


class AllPositionsTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1]
        targets = inputs["input_ids"][:, 1:]  # BUG: ignores the labels' -100, trains prompt and padding
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return (loss, outputs) if return_outputs else loss


cls = AllPositionsTrainer if args.variant == "ignored" else Trainer
out = tempfile.mkdtemp(prefix="sftdoctor-trainer-bf16-")
targs = TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=args.accum,
                          max_steps=args.steps, learning_rate=1e-3, bf16=True, use_cpu=True, report_to=[],
                          logging_steps=1, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
trainer = cls(model=model, args=targs, train_dataset=features,
              data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
trainer.train()
