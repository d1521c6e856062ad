"""Tiny random-init causal LMs built from config, and a byte-level BPE tokenizer trained
in-process: what `sftdoctor train --model tiny`, the examples and the tests run on (no Hub).
"""
from __future__ import annotations

from typing import Iterable

import torch

ARCHS = ("qwen2", "llama", "gpt2")
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def tiny_config(arch: str = "qwen2", vocab_size: int = 2048, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int | None = None, max_positions: int = 1024,
                dtype: str | None = None, tie: bool = True, **extra):
    """A transformers config for a small model of one of ARCHS, sized to `vocab_size`."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    inter = intermediate or hidden * 4
    if arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=max_positions,
                          tie_word_embeddings=tie, use_cache=False, **extra)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=max_positions,
                          tie_word_embeddings=tie, use_cache=False, **extra)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                         n_inner=inter, tie_word_embeddings=tie, use_cache=False,
                         **{"bos_token_id": None, "eos_token_id": None, **extra})  # GPT-2's 50256 would not fit
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if dtype:
        cfg.dtype = dtype  # what the checkpoint says it was trained in (e.g. bfloat16)
    return cfg


def tiny_model(arch: str = "qwen2", vocab_size: int = 2048, *, seed: int = 0, attn: str = "sdpa", **kw):
    """A random-init *ForCausalLM (fp32) from tiny_config; deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, vocab_size, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    if kw.get("dtype"):
        model.config.dtype = kw["dtype"]  # from_config(dtype=float32) overwrote what the checkpoint says
    return model


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, *, chat_template: bool = True):
    """A byte-level BPE tokenizer trained here on `texts`, with a pad token distinct from eos.

    Specials: <|endoftext|> (eos), <|pad|> (pad), <|im_start|>, <|im_end|> (end of turn).
    Digits are split one per token (as Qwen does), which makes arithmetic learnable by tiny models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(list(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.padding_side = "right"
    if chat_template:
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    return tok
