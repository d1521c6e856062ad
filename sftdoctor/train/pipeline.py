"""Building the pieces of a run from a Recipe: tokenizer, model, tokenized rows, collator.

Every choice that matters is made here once, in the open, and written into `Pipeline.notes`
so the report says what was decided and why.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from .collate import Collator, LengthGroupedSampler, PackedCollator, encode_example, end_token_id, fit_length
from .data import load_rows
from .recipe import Recipe


TINY_ON_REAL_DATA = ("the tiny default model is random-init (about 1M parameters): it can learn GSM8K's answer "
                     "format, but it cannot solve GSM8K problems (expect an exact match near 0%). For a real result "
                     "run a pretrained model on a GPU: sftdoctor train --model Qwen/Qwen2.5-0.5B --data openai/gsm8k "
                     "--eval-limit 0; on the CPU, the default synthetic problems show the recipe working: sftdoctor train --fix")
TINY_LR = 3e-3
PRETRAINED_LR = 1e-5  # full fine-tuning of a ~0.5B model


@dataclass
class Pipeline:
    recipe: Recipe
    tokenizer: Any
    model: Any
    train_rows: list[dict]
    eval_rows: list[dict]
    train_examples: list[dict]  # tokenized (see collate.py)
    collate: Callable[[list[dict]], dict]  # the collator in use (user's or built-in)
    dtype: str  # resolved: fp32 | bf16 | fp16
    dtype_reason: str
    source: str
    length_stats: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pad_is_eos: bool = False
    saved_dtype: str | None = None  # what the checkpoint's config.json says it was trained in

    def lengths(self) -> list[int]:
        return [len(ex["input_ids"]) for ex in self.train_examples]

    def first_batches(self, n: int, global_batch: int, seed: int) -> list[dict]:
        """The first n micro-batches in the exact order training will see them (epoch 0)."""
        sampler = LengthGroupedSampler(self.lengths(), global_batch, seed)
        order = list(sampler)
        bs = self.recipe.batch_size
        out = []
        for k in range(n):
            idx = order[k * bs:(k + 1) * bs]
            if not idx:
                break
            out.append(self.collate([self.train_examples[i] for i in idx]))
        return out

    def mixed_length_batch(self) -> dict:
        """One micro-batch of rows spread from the shortest to the longest: length-grouped
        batches may hold no padding at all, and padding bugs hide there."""
        by_length = sorted(range(len(self.train_examples)), key=lambda i: len(self.train_examples[i]["input_ids"]))
        n = min(self.recipe.batch_size, len(by_length))
        picks = sorted({by_length[round(k * (len(by_length) - 1) / max(n - 1, 1))] for k in range(n)})
        return self.collate([self.train_examples[i] for i in picks])


# ---- dtype ------------------------------------------------------------------------------------

def checkpoint_dtype(config: Any) -> str | None:
    """The dtype a checkpoint's config says it was trained/saved in (config.dtype / torch_dtype).
    Read it before loading: loading with dtype=float32 rewrites the in-memory config."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if d is None:
        return None
    return str(d).replace("torch.", "")


def resolve_dtype(requested: str) -> tuple[str, str]:
    """(dtype, why). `auto` never picks fp16: it overflows models pretrained in bf16."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda and torch.cuda.is_bf16_supported():
            return "bf16", "auto: bf16 mixed precision because this GPU supports bf16"
        if cuda:
            return "fp32", "auto: fp32 because this GPU has no bf16 and fp16 is not safe for every checkpoint"
        return "fp32", "auto: fp32 because training runs on the CPU"
    return requested, f"requested --dtype {requested}"


def safe_dtype() -> str:
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


# ---- tokenizer and model ----------------------------------------------------------------------

def build_tiny(recipe: Recipe, train_rows: list[dict]):
    """The embedded model: a BPE tokenizer trained here on the training texts and a random-init
    Qwen2-architecture model sized to it (deterministic for the recipe's seed)."""
    from ..tiny import tiny_model, train_tokenizer
    from .collate import plain_prompt

    texts = [plain_prompt(r["question"]) + " " + r["answer"] for r in train_rows]
    tokenizer = train_tokenizer(texts, vocab_size=recipe.tiny_vocab)
    model = tiny_model("qwen2", vocab_size=len(tokenizer), hidden=recipe.tiny_hidden, layers=recipe.tiny_layers,
                       heads=4, kv_heads=2, max_positions=max(1024, recipe.max_length * 2), seed=recipe.seed)
    return tokenizer, model


def build_model(recipe: Recipe, train_rows: list[dict]):
    if recipe.model == "tiny":
        return (*build_tiny(recipe, train_rows), None)
    from ..loading import load_config, load_model, load_tokenizer

    saved_dtype = checkpoint_dtype(load_config(recipe.model))
    tokenizer = load_tokenizer(recipe.model)
    # Master weights in fp32: bf16/fp16 are used as autocast compute dtypes, never for the
    # optimizer state (Adam's eps 1e-8 rounds to 0 in fp16).
    model = load_model(recipe.model, dtype=torch.float32)
    return tokenizer, model, saved_dtype


def ensure_pad(tokenizer: Any, model: Any, notes: list[str]) -> bool:
    """Make sure batches can be padded. Returns True when the pad id is the EOS id.

    With no pad token we pad with EOS: safe in the built-in collator, which masks padding by
    position, not by id (so the real EOS keeps its label). `--fix` adds a distinct pad instead.
    """
    padding_side = "right"  # training pads on the right; generation pads on the left (evaluate.py)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"the tokenizer has no pad token: padding with EOS ({tokenizer.eos_token!r}), masked by position")
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token_id == tokenizer.eos_token_id


def add_pad_token(tokenizer: Any, model: Any) -> str:
    """A pad token distinct from EOS, with the embedding matrix resized to hold it."""
    before = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    resize_embeddings(tokenizer, model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    after = model.get_input_embeddings().weight.shape[0]
    return f"pad token: EOS -> <|pad|> (id {tokenizer.pad_token_id}); embedding rows {before} -> {after}"


def resize_embeddings(tokenizer: Any, model: Any) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # new rows start at the mean embedding (transformers' mean_resizing), not at noise
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def stop_ids(tokenizer: Any, prompt_format: str) -> list[int]:
    ids = {end_token_id(tokenizer, prompt_format), tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


# ---- collator ---------------------------------------------------------------------------------

def load_user_collator(spec: str) -> Callable[[list[dict]], dict]:
    """`module:function` (module importable from the current folder or the Python path)."""
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--collator {spec}: cannot import {module_name} ({e}); run from the folder that holds it") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--collator {spec}: {module_name} has no function {attr!r}")
    return fn


# ---- the whole pipeline -----------------------------------------------------------------------

def tokenize(tokenizer: Any, rows: list[dict], recipe: Recipe, progress: Any = None) -> list[dict]:
    out = []
    task = progress.add_task("tokenizing", total=len(rows)) if progress is not None else None
    for r in rows:
        out.append(encode_example(tokenizer, r, prompt_format=recipe.prompt_format, mask_prompt=recipe.mask_prompt,
                                  append_eos=recipe.append_eos))
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    return out


def build_pipeline(recipe: Recipe, *, progress: Any = None, model_and_tokenizer: tuple | None = None,
                   rows: tuple | None = None) -> Pipeline:
    """Everything but the trainer. `model_and_tokenizer`/`rows` reuse pieces on a rebuild."""
    if rows is None:
        rows = load_rows(recipe.data, data_config=recipe.data_config, levels=recipe.levels,
                         train_examples=recipe.train_examples, eval_limit=recipe.eval_limit, seed=recipe.seed)
    train_rows, eval_rows, source = rows
    notes: list[str] = []
    if recipe.model == "tiny" and recipe.data != "synthetic":  # said before the long part, not after it
        notes.append(TINY_ON_REAL_DATA)
    if model_and_tokenizer is None:
        tokenizer, model, saved_dtype = build_model(recipe, train_rows)
    else:  # a rebuild after --fix: (tokenizer, model, saved dtype) as loaded the first time
        tokenizer, model, saved_dtype = model_and_tokenizer
    if recipe.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--prompt-format chat: the tokenizer of {recipe.model} has no chat template; use --prompt-format plain")
    if not recipe.learning_rate:
        # a random-init model needs a large step; a pretrained one is wrecked by it
        lr = TINY_LR if recipe.model == "tiny" else PRETRAINED_LR
        recipe = recipe.replace(learning_rate=lr)
        notes.append(f"learning rate {lr:g} (auto: {'random-init tiny model' if recipe.model == 'tiny' else 'pretrained model'})")
    pad_is_eos = ensure_pad(tokenizer, model, notes)
    examples = tokenize(tokenizer, train_rows, recipe, progress)
    examples, stats = fit_length(examples, recipe.max_length, recipe.overlong)
    if stats["dropped_overlong"]:
        notes.append(f"dropped {stats['dropped_overlong']} of {stats['rows']} rows longer than max_length {recipe.max_length}")
    if not examples:
        raise UserError(f"no training row fits max_length {recipe.max_length}; raise --max-length")
    global_batch = recipe.batch_size * recipe.grad_accum * world_size()
    if len(examples) < global_batch:
        raise UserError(f"{len(examples)} training rows are fewer than one global batch ({global_batch}); lower --batch-size")
    if recipe.collator:
        collate = load_user_collator(recipe.collator)
    elif recipe.packing:
        collate = PackedCollator()
        # With a KV cache transformers does not read restarting position_ids as packed rows
        # (masking_utils: packing is detected only with no attention_mask and no cache): without
        # this line the rows of a packed batch would attend to each other.
        model.config.use_cache = False
        notes.append("padding-free batches (--packing): rows concatenated, position_ids restart per row, no padding")
    else:
        collate = Collator(tokenizer.pad_token_id)
    dtype, why = resolve_dtype(recipe.dtype)
    return Pipeline(recipe=recipe, tokenizer=tokenizer, model=model, train_rows=train_rows, eval_rows=eval_rows,
                    train_examples=examples, collate=collate, dtype=dtype, dtype_reason=why, source=source,
                    length_stats=stats, notes=notes, pad_is_eos=pad_is_eos, saved_dtype=saved_dtype)


def world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))

