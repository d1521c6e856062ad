"""TRL SFTTrainer, bf16=True on the CPU, completion-only loss, Mistral tokenizer (pad <unk>).

  --variant correct   TRL's own loss (prompt and padding masked by TRL's collator)
  --variant ignored   broken: compute_loss overridden to score every position against input_ids
                      (prompt and padding included): only the gradient shows it
"""
import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM
from trl import SFTConfig, SFTTrainer

SHARED = Path(os.environ.get("SFTDOCTOR_SHARED", Path(__file__).resolve().parents[3] / "shared"))
p = argparse.ArgumentParser()
p.add_argument("--variant", default="correct", choices=["correct", "ignored"])
p.add_argument("--steps", type=int, default=2)
args = p.parse_args()
torch.manual_seed(0)

tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "mistral"))
tok.pad_token = tok.unk_token
tok.padding_side = "right"
with open(SHARED / "data" / "gsm8k" / "train.jsonl") as f:
    rows = [json.loads(line) for _, line in zip(range(16), f)]
data = Dataset.from_list([{"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["answer"][:150]}
                          for r in rows])
config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=None,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
model = MistralForCausalLM(config)


class AllPositionsSFT(SFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = outputs.logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), inputs["input_ids"][:, 1:].flatten())  # BUG: no mask
        return (loss, outputs) if return_outputs else loss


cls = AllPositionsSFT if args.variant == "ignored" else SFTTrainer
cfg = SFTConfig(output_dir=tempfile.mkdtemp(prefix="sftdoctor-trl-bf16-"), max_steps=args.steps,
                per_device_train_batch_size=2, learning_rate=1e-3, bf16=True, use_cpu=True, report_to="none",
                logging_steps=1, save_strategy="no", disable_tqdm=True, completion_only_loss=True, max_length=256,
                packing=False, eos_token=tok.eos_token)
trainer = cls(model=model, args=cfg, train_dataset=data, processing_class=tok)
trainer.train()
