"""The training recipe: ONE dataclass, every default in one place.

Each field is a CLI flag (`--learning-rate 3e-4`) and a key of an optional config file
(`--config recipe.yaml` or `recipe.toml`, flat keys with the field names). Precedence: the
dataclass default < the config file < the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..dtypes import short_name
from ..errors import UserError


@dataclass
class Recipe:
    # ---- what to train ---------------------------------------------------------------------
    model: str = field(default="tiny", metadata={"help": "a Hub id, a local model folder, or `tiny` (a random-init 4-layer Qwen2-architecture model with a tokenizer trained here on the data)"})
    data: str = field(default="synthetic", metadata={"help": "`openai/gsm8k` (Hub), a local folder or .jsonl with question/answer fields, or `synthetic` (built-in GSM8K-format word problems)"})
    data_config: str = field(default="main", metadata={"help": "the Hub dataset config (GSM8K: main or socratic)"})
    levels: str = field(default="1", metadata={"help": "synthetic difficulty levels, comma separated (1: a+b, 2: a-b or a+b up to 20, 3: two steps, 4: products)"})
    train_examples: int = field(default=0, metadata={"help": "training rows: synthetic problems generated (0: 2000); real data: the first N rows (0: all)"})
    prompt_format: str = field(default="plain", metadata={"help": "`plain` (Question: ...\\nAnswer: ...) or `chat` (the tokenizer's chat template)"})
    max_length: int = field(default=512, metadata={"help": "longest training row in tokens; longer rows are dropped and counted, never cut (--overlong)"})
    overlong: str = field(default="drop", metadata={"help": "rows longer than max_length: `drop` them (counted in the report) or `truncate` them (loses the answer: preflight refuses)"})
    mask_prompt: bool = field(default=True, metadata={"help": "supervise only the answer (+EOS); --no-mask-prompt trains on the question too"})
    append_eos: bool = field(default=True, metadata={"help": "end each answer with the EOS / end-of-turn token so the model learns to stop"})
    collator: str | None = field(default=None, metadata={"help": "`module:function`: your own collate function (list of tokenized examples -> batch dict) instead of the built-in one"})
    packing: bool = field(default=False, metadata={"help": "padding-free batches: each micro-batch's rows concatenated into one row, position_ids restarting per row (attention cannot cross rows); no position is spent on padding"})
    # ---- how to train ----------------------------------------------------------------------
    loss_kernel: str = field(default="torch", metadata={"help": "the lean loss's kernel: `torch` (chunked, any device), `liger` (Liger Kernel's fused linear cross-entropy plus its RMSNorm/SwiGLU/RoPE kernels; CUDA with liger-kernel installed)"})
    lean_loss: str = field(default="always", metadata={"help": "the lm_head + cross-entropy in chunks, never the full batch x length x vocabulary logits: `always` (the logit checks run at preflight, not during training), `sampled` (full logits on the steps the probes sample), `off` (the model's own loss)"})
    dtype: str = field(default="auto", metadata={"help": "`auto` (bf16 on a GPU that supports it, fp32 on the CPU), fp32, bf16, or fp16 (mixed precision with a loss scaler, CUDA only; refused on a bf16 checkpoint); float32/bfloat16/float16 are accepted too"})
    learning_rate: float = field(default=0.0, metadata={"help": "peak learning rate (AdamW); 0: auto, 3e-3 for the tiny random-init model, 1e-5 for a pretrained one"})
    schedule: str = field(default="cosine", metadata={"help": "learning-rate schedule after warmup: cosine, linear or constant"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the optimizer steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=0, metadata={"help": "stop after N optimizer steps (0: --epochs decides); a quick look at a long run"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (the loss is normalised over all their supervised tokens)"})
    seed: int = field(default=0, metadata={"help": "seed for the model init, the data order and the synthetic problems"})
    save_every: int = field(default=0, metadata={"help": "also save a checkpoint every N optimizer steps (0: only at the end of each epoch)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: the cores not already busy by the load average, at most 8, split between local processes)"})
    # ---- evaluation ------------------------------------------------------------------------
    eval_limit: int = field(default=200, metadata={"help": "held-out problems to evaluate (0: the whole test split)"})
    eval_batch_size: int = field(default=50, metadata={"help": "rows per generation batch"})
    max_new_tokens: int = field(default=0, metadata={"help": "generation budget per answer (0: 1.5x the longest training answer, at least 32)"})
    # ---- the tiny model ---------------------------------------------------------------------
    tiny_layers: int = field(default=4, metadata={"help": "tiny model: transformer layers"})
    tiny_hidden: int = field(default=64, metadata={"help": "tiny model: hidden size"})
    tiny_vocab: int = field(default=512, metadata={"help": "tiny model: tokenizer vocabulary size (trained on the data)"})
    # ---- where -----------------------------------------------------------------------------
    output_dir: str = field(default="", metadata={"help": "where checkpoints, the final model and report.json go (default: runs/train-<time>)"})

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "prompt_format": ("plain", "chat"),
    "overlong": ("drop", "truncate"),
    "dtype": ("auto", "fp32", "bf16", "fp16"),
    "schedule": ("cosine", "linear", "constant"),
    "lean_loss": ("always", "sampled", "off"),
    "loss_kernel": ("torch", "liger"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per Recipe field; defaults are None so that only what was typed overrides."""
    g = p.add_argument_group("recipe (defaults in sftdoctor/train/recipe.py; also settable in --config)")
    for f in fields(Recipe):
        default = f.default
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if f.type in ("bool", bool):
            g.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        if f.name == "dtype":
            kind = short_name  # both spellings, fp16 and float16, as in `diagnose`
        g.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, metavar=f.name.split("_")[-1].upper(),
                       choices=CHOICES.get(f.name), help=help_text)


def load_config_file(path: str) -> dict[str, Any]:
    """A flat mapping of Recipe fields from a .yaml/.yml or .toml file."""
    from ..paths import require_regular_file

    p = require_regular_file(path, "config file")  # a FIFO would block the read
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UserError(f"{path} is YAML but pyyaml is not installed; pip install pyyaml, or use a .toml file") from None
            data = yaml.safe_load(text) or {}
        elif p.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise UserError(f"config file {path}: use a .yaml, .yml or .toml file")
    except UserError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"config file {path} is not valid: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of recipe fields (model: ..., learning_rate: ...)")
    return data


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    t = str(f.type)
    try:
        if t == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if t == "int":
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            return int(value)
        if t == "float":
            return float(value)
        return None if value is None else str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {f.name} must be {t}, got {value!r}") from None


def build_recipe(args: argparse.Namespace | None = None, config_path: str | None = None, **overrides: Any) -> Recipe:
    """Defaults < config file < command-line flags < keyword overrides."""
    by_name = {f.name: f for f in fields(Recipe)}
    values: dict[str, Any] = {}
    if config_path:
        for key, value in load_config_file(config_path).items():
            name = key.replace("-", "_")
            if name not in by_name:
                raise UserError(f"config file {config_path}: unknown key {key!r}; known keys are the recipe fields ({', '.join(sorted(by_name))})")
            values[name] = _coerce(by_name[name], value, f"config file {config_path}")
    if args is not None:
        for name in by_name:
            v = getattr(args, name, None)
            if v is not None:
                values[name] = v
    values.update(overrides)
    if isinstance(values.get("dtype"), str):
        values["dtype"] = short_name(values["dtype"])  # a config file may say float16 too
    for name, allowed in CHOICES.items():
        if name in values and values[name] not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}, got {values[name]!r}")
    recipe = Recipe(**values)
    check_recipe(recipe)
    return recipe


def check_recipe(r: Recipe) -> None:
    for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "tiny_layers", "tiny_hidden", "tiny_vocab"):
        if getattr(r, name) <= 0:
            raise UserError(f"{name} must be positive, got {getattr(r, name)}")
    if r.max_steps < 0:
        raise UserError(f"max_steps must be >= 0 (0: --epochs decides), got {r.max_steps}")
    if r.epochs <= 0 or r.learning_rate < 0:
        raise UserError("epochs must be positive and learning_rate positive (or 0 for auto)")
    if not 0 <= r.warmup_ratio < 1:
        raise UserError(f"warmup_ratio must be in [0, 1), got {r.warmup_ratio}")
    if r.collator is not None and ":" not in r.collator:
        raise UserError(f"--collator {r.collator!r}: give module:function, e.g. mypkg.data:collate")
