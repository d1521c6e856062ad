"""Saved checkpoints for the diagnose tests: tiny real models TRAINED for a few seconds on CPU,
each the way a broken (or correct) fine-tune would leave it, saved with save_pretrained.

The tokenizer is a byte-level BPE trained here on GSM8K text with no specials in the trainer,
so that, as in GPT-2 and Qwen, id 0 is `!` and the specials sit at the end of the vocab.
Training rows are GSM8K test questions with the short answer ` #### N` (learnable in seconds).
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from conftest import gsm8k_rows, prompt_text
from sftdoctor.tiny import tiny_model

VOCAB = 1024  # BPE merges + byte alphabet; 4 specials follow (eos 1024, pad 1025, im_start, im_end)
ROWS = 8  # training rows: 8 short GSM8K test questions (diagnose runs on the same prompts)
MAX_LENGTH = 96  # pad-to length for the supervised-padding fixture (padding dominates, as in the incident)


@lru_cache(maxsize=1)
def _base_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([r["question"] + " " + r["answer"] for r in gsm8k_rows("train", 400)], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.padding_side = "right"
    assert tok.convert_ids_to_tokens(0) == "!"  # the incident's token 0
    return tok


def make_tokenizer(*, pad_is_eos: bool = False):
    tok = copy.deepcopy(_base_tokenizer())
    if pad_is_eos:
        tok.pad_token = tok.eos_token  # Qwen2.5 base / GPT-2 habit: pad = <|endoftext|> = eos
    return tok


def train_rows(n: int = ROWS) -> list[dict]:
    """The n shortest of the first 300 GSM8K test questions (short rows train in seconds)."""
    out = []
    for r in sorted(gsm8k_rows("test", 300), key=lambda r: len(r["question"]))[:n]:
        final = re.search(r"####\s*(.+)", r["answer"]).group(1).strip()
        out.append({"question": r["question"], "answer": f" #### {final}"})
    return out


def write_prompts(path: Path, n: int = ROWS) -> Path:
    """The training questions as a diagnose --prompts jsonl."""
    path.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in train_rows(n)), encoding="utf-8")
    return path


def make_batch(tok, mode: str = "healthy") -> dict[str, torch.Tensor]:
    """One batch of the training rows.

    healthy:       prompt -100, answer + eos supervised, padding -100 (pad distinct from eos).
    pad_zero:      labels padded with 0 (`!`) to MAX_LENGTH instead of -100: the learned `!!!!` cause.
    eos_masked:    pad == eos and labels[labels == pad_id] = -100: the real EOS is masked too.
    """
    feats = []
    for r in train_rows():
        p = tok(prompt_text(r["question"]))["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        feats.append((p + a, [-100] * len(p) + a))
    T = MAX_LENGTH if mode == "pad_zero" else max(len(i) for i, _ in feats)
    label_pad = 0 if mode == "pad_zero" else -100  # the bug: 0 is a real token id (`!`)
    ids = torch.full((len(feats), T), tok.pad_token_id)
    labels = torch.full((len(feats), T), label_pad)
    attn = torch.zeros((len(feats), T), dtype=torch.long)
    for b, (i, lab) in enumerate(feats):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(lab)] = torch.tensor(lab)
        attn[b, : len(i)] = 1
    if mode == "eos_masked":
        labels[labels == tok.pad_token_id] = -100  # masks padding AND every real EOS (pad == eos)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def new_model(tok, seed: int = 0):
    model = tiny_model("qwen2", vocab_size=len(tok), hidden=64, layers=2, seed=seed)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def train(model, batch, *, steps: int, lr: float, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def save(model, tok, folder: Path, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---- the checkpoints ------------------------------------------------------------------------------


def healthy(folder: Path, steps: int = 60) -> Path:
    """Correct completion-only training: answers and EOS learned, padding ignored."""
    tok = make_tokenizer()
    model = new_model(tok)
    train(model, make_batch(tok, "healthy"), steps=steps, lr=1e-2)
    return save(model, tok, folder)


def pad_zero(folder: Path, steps: int = 25) -> Path:
    """Labels padded with 0 (`!`): most supervised targets are id 0 and a few high-lr steps make
    the model emit it everywhere (finite logits: the learned family)."""
    tok = make_tokenizer(pad_is_eos=True)
    model = new_model(tok, seed=1)
    train(model, make_batch(tok, "pad_zero"), steps=steps, lr=1e-2)
    return save(model, tok, folder)


def eos_masked(folder: Path, steps: int = 60) -> Path:
    """pad == eos with labels masked by id: answers learned, EOS never supervised."""
    tok = make_tokenizer(pad_is_eos=True)
    model = new_model(tok, seed=2)
    train(model, make_batch(tok, "eos_masked"), steps=steps, lr=1e-2)
    return save(model, tok, folder)


def fp16_adam_nan(folder: Path) -> tuple[Path, bool]:
    """Pure fp16 parameters optimised by Adam(eps=1e-8): eps rounds to 0 in fp16, so a parameter
    whose squared gradient underflows divides 0 by 0. Returns (folder, reproduced): reproduced is
    False when the run stayed finite and NaN had to be injected instead (it is reproduced on CPU
    with torch 2.x; the fallback keeps the test meaningful elsewhere)."""
    tok = make_tokenizer()
    model = new_model(tok, seed=3).to(torch.float16)
    batch = make_batch(tok, "healthy")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-8)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    reproduced = any(not torch.isfinite(p).all() for p in model.parameters())
    if not reproduced:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, :4] = float("nan")
    return save(model, tok, folder), reproduced


def fp16_overflow(folder: Path, healthy_folder: Path, scale: float = 3e4) -> Path:
    """A healthy model with one MLP's output projection scaled up: its activations pass 65504 (fp16
    inf) while fp32 stays finite (the final RMSNorm rescales the residual). Saved in fp16, its weights
    stay below the fp16 limit, so only the forward pass overflows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(healthy_folder, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(scale)
    tok = make_tokenizer()
    return save(model, tok, folder, dtype=torch.float16)


# ---- broken files -------------------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncated(src: Path, dst: Path) -> Path:
    copy_checkpoint(src, dst)
    f = dst / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)  # an interrupted save / download
    return dst


def truncated_bin(src: Path, dst: Path) -> Path:
    """The same checkpoint as a torch .bin, cut short."""
    from safetensors.torch import load_file

    copy_checkpoint(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    f = dst / "pytorch_model.bin"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return dst


def without(src: Path, dst: Path, *names: str) -> Path:
    copy_checkpoint(src, dst)
    for n in names:
        (dst / n).unlink(missing_ok=True)
    return dst


def edit_json(folder: Path, name: str, **changes) -> None:
    p = folder / name
    data = json.loads(p.read_text(encoding="utf-8"))
    data.update(changes)
    p.write_text(json.dumps(data, indent=1), encoding="utf-8")
