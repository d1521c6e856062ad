"""The probe context: everything a probe may read, as plain data.

Adapters (a batch dict, an HF Trainer, a raw loop, a checkpoint) fill it; probes only read it.
Probes never import transformers: what they need of the tokenizer and the model is copied into
TokenizerInfo and ModelInfo here, once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from .constants import IGNORE_INDEX
from .errors import UserError
from .tokens import classify

if TYPE_CHECKING:  # annotations only: these modules import this one
    from .checkpoint import CheckpointRecord
    from .stepstats import RunHistory, StepRecord

__all__ = ["Hints", "NEEDS", "IGNORE_INDEX", "Batch", "ModelInfo", "ProbeContext", "TokenizerInfo"]


@dataclass
class TokenizerInfo:
    """What probes need to know about a tokenizer, with no transformers object attached."""

    class_name: str = "?"
    name_or_path: str = ""
    pad_id: int | None = None
    pad_token: str | None = None
    eos_ids: frozenset[int] = frozenset()  # eos plus end-of-turn tokens (<|im_end|>, <|eot_id|>, ...)
    eos_token: str | None = None
    bos_id: int | None = None
    special_ids: frozenset[int] = frozenset()  # every special/added-special token id
    vocab_len: int = 0  # len(tokenizer): regular plus added tokens
    padding_side: str = "right"
    chat_template: str | None = None
    add_bos: bool = False  # does tokenizer(text) prepend a BOS by itself?
    # Callables kept for rendering and template checks; probes must cope with them being None
    # (a report re-loaded from JSON has none).
    decode: Callable[[list[int]], str] | None = field(default=None, repr=False)
    convert_ids_to_tokens: Callable[[list[int]], list[str]] | None = field(default=None, repr=False)
    encode: Callable[..., list[int]] | None = field(default=None, repr=False)
    apply_chat_template: Callable[..., Any] | None = field(default=None, repr=False)

    @property
    def pad_is_eos(self) -> bool:
        return self.pad_id is not None and self.pad_id in self.eos_ids

    def token_text(self, token_id: int) -> str:
        """Readable text of one id ('' when no decoder is attached)."""
        if token_id < 0:
            return ""
        if self.decode is not None:
            try:
                text = self.decode([int(token_id)])
            except Exception:
                return ""
            # SentencePiece (Llama-2, Mistral, Gemma): a word-initial piece is '▁word', and decoding it alone
            # drops the space; keep it, so a row reads as the tokenizer decodes the whole sequence
            if self.convert_ids_to_tokens is not None and not text.startswith(" "):
                try:
                    piece = self.convert_ids_to_tokens([int(token_id)])[0]
                except Exception:
                    piece = None
                if isinstance(piece, str) and piece.startswith("\u2581") and int(token_id) not in self.special_ids:
                    text = " " + text
            return text
        return ""

    @classmethod
    def from_tokenizer(cls, tok: Any) -> "TokenizerInfo":
        """Adapter from an HF tokenizer (duck-typed: no transformers import here)."""
        def _id(x):
            return int(x) if isinstance(x, int) else None

        eos_ids = set()
        if _id(getattr(tok, "eos_token_id", None)) is not None:
            eos_ids.add(int(tok.eos_token_id))
        # End-of-turn tokens are EOS for supervision purposes: a chat model stops on them.
        vocab = {}
        try:
            vocab = tok.get_added_vocab() if hasattr(tok, "get_added_vocab") else {}
        except Exception:
            vocab = {}
        for text in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>"):
            if text in vocab:  # e.g. Qwen: <|endoftext|> ends base-model text, <|im_end|> ends a turn
                eos_ids.add(int(vocab[text]))
        special = set()
        for i in getattr(tok, "all_special_ids", []) or []:
            if isinstance(i, int):
                special.add(i)
        try:
            for t in getattr(tok, "added_tokens_decoder", {}).values():
                if getattr(t, "special", False):
                    special.add(int(tok.convert_tokens_to_ids(t.content)))
        except Exception:
            pass
        add_bos = False
        try:
            ids = tok("a", add_special_tokens=True)["input_ids"]
            add_bos = bool(ids) and _id(getattr(tok, "bos_token_id", None)) is not None and ids[0] == tok.bos_token_id
        except Exception:
            pass
        return cls(
            class_name=type(tok).__name__,
            name_or_path=str(getattr(tok, "name_or_path", "")),
            pad_id=_id(getattr(tok, "pad_token_id", None)),
            pad_token=getattr(tok, "pad_token", None),
            eos_ids=frozenset(eos_ids),
            eos_token=getattr(tok, "eos_token", None),
            bos_id=_id(getattr(tok, "bos_token_id", None)),
            special_ids=frozenset(special),
            vocab_len=len(tok),
            padding_side=getattr(tok, "padding_side", "right") or "right",
            chat_template=getattr(tok, "chat_template", None) if isinstance(getattr(tok, "chat_template", None), str) else None,
            add_bos=add_bos,
            decode=lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
            convert_ids_to_tokens=getattr(tok, "convert_ids_to_tokens", None),
            encode=lambda text, add_special_tokens=False: tok(text, add_special_tokens=add_special_tokens)["input_ids"],
            apply_chat_template=getattr(tok, "apply_chat_template", None),
        )


@dataclass
class ModelInfo:
    """What probes need to know about a model: its config and embedding size, never the object."""

    model_type: str | None = None
    architecture: str | None = None
    embedding_rows: int | None = None  # rows of the input embedding (or config.vocab_size)
    config_dtype: str | None = None  # config.torch_dtype / dtype: what the checkpoint was trained in
    param_dtype: str | None = None  # dtype of the parameters as loaded now
    tie_word_embeddings: bool | None = None
    max_position_embeddings: int | None = None
    uses_absolute_positions: bool = False  # GPT-2 style learned positions
    attn_implementation: str | None = None
    name_or_path: str = ""

    @classmethod
    def from_config(cls, config: Any) -> "ModelInfo":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        archs = getattr(config, "architectures", None) or []
        mtype = getattr(config, "model_type", None)
        return cls(
            model_type=mtype,
            architecture=archs[0] if archs else None,
            embedding_rows=getattr(config, "vocab_size", None),
            config_dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
            tie_word_embeddings=getattr(config, "tie_word_embeddings", None),
            max_position_embeddings=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
            uses_absolute_positions=mtype in {"gpt2", "gpt_neo", "opt", "gptj", "bloom"} and mtype != "bloom",
            attn_implementation=getattr(config, "_attn_implementation", None),
            name_or_path=str(getattr(config, "_name_or_path", "")),
        )

    @classmethod
    def from_model(cls, model: Any) -> "ModelInfo":
        info = cls.from_config(model.config)
        try:
            emb = model.get_input_embeddings()
            info.embedding_rows = int(emb.weight.shape[0])
        except Exception:
            pass
        try:
            info.param_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        except Exception:
            pass
        return info


@dataclass
class Batch:
    """One collated training batch, normalised to HF conventions.

    labels[b, t] is the target for input_ids[b, t] *before* the model's internal shift (HF
    *ForCausalLM shifts by one: logits[t] predicts labels[t+1]); IGNORE_INDEX means no loss.
    When the collator gave a loss mask instead, labels = where(loss_mask, input_ids, -100).
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor | None = None  # [B, T] 0/1
    labels: torch.Tensor | None = None  # [B, T] long, -100 = ignored
    position_ids: torch.Tensor | None = None  # [B, T]
    loss_mask: torch.Tensor | None = None  # [B, T] as given, when the collator returned one
    labels_source: str = "labels"  # "labels" | "loss_mask" | "none"
    extra_keys: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    @classmethod
    def from_mapping(cls, batch: Mapping[str, Any]) -> "Batch":
        """Adapter from what a collator returns (dict/BatchEncoding of tensors or lists)."""
        if not hasattr(batch, "keys"):
            raise UserError(f"the batch is a {type(batch).__name__}, not a dict; save the dict your collator returns")
        if "input_ids" not in batch or batch.get("input_ids") is None:
            keys = ", ".join(sorted(map(str, batch.keys()))) or "none"
            raise UserError(f"the batch has no 'input_ids' (keys: {keys}); save the dict your collator returns")

        def tensor(name):
            v = batch.get(name)
            if v is None:
                return None
            t = _as_tensor(name, v)
            if t.dim() == 1:
                t = t.unsqueeze(0)
            if t.dim() != 2:
                raise UserError(f"batch field '{name}' has shape {tuple(t.shape)}; expected [batch, seq]")
            return t

        input_ids = tensor("input_ids").long()
        B, T = input_ids.shape
        # an empty batch is not an error: inspect_batch skips every check and says inconclusive
        out = {}
        for name in ("attention_mask", "labels", "position_ids", "loss_mask"):
            t = tensor(name)
            if t is not None and tuple(t.shape) != (B, T):
                # 4D masks and packed-sequence extras are legitimate; only [B, T] fields are checked here
                raise UserError(f"batch field '{name}' has shape {tuple(t.shape)} but input_ids is {(B, T)}")
            out[name] = t
        labels, source = out["labels"], "labels"
        if labels is not None:
            labels = labels.long()
        elif out["loss_mask"] is not None:
            # loss_mask[t] == 1 means "token t is a target" (same alignment as HF labels)
            labels = torch.where(out["loss_mask"].bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
            source = "loss_mask"
        else:
            source = "none"
        return cls(
            input_ids=input_ids,
            attention_mask=out["attention_mask"].long() if out["attention_mask"] is not None else None,
            labels=labels,
            position_ids=out["position_ids"].long() if out["position_ids"] is not None else None,
            loss_mask=out["loss_mask"],
            labels_source=source,
            extra_keys=tuple(k for k in batch.keys() if k not in {"input_ids", "attention_mask", "labels", "position_ids", "loss_mask"}),
        )


# token ids, targets and positions are integers; masks may be 0/1 floats or bools
_INTEGER_FIELDS = ("input_ids", "labels", "position_ids")


def _as_tensor(name: str, v: Any) -> torch.Tensor:
    """A batch field as a CPU tensor, or one UserError that says what is wrong with it."""
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu()
    else:
        try:
            t = torch.as_tensor(v)
        except (ValueError, TypeError, RuntimeError, OverflowError) as e:
            if "expected sequence of length" in str(e):
                raise UserError(f"batch field '{name}' has rows of different lengths; pad them to one length "
                                "(what your collator returns) or save the collated batch") from None
            raise UserError(f"batch field '{name}' does not hold numbers ({type(v).__name__}: {str(e)[:80]}); "
                            "it must be a tensor or nested lists of token ids") from None
    if t.dtype.is_complex or (name in _INTEGER_FIELDS and t.is_floating_point()):
        raise UserError(f"batch field '{name}' holds {str(t.dtype).replace('torch.', '')} values; token ids and labels must be "
                        f"integers (HF's loss refuses float labels): build them as torch.long, or .long() them in your collator")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise UserError(f"batch field '{name}' holds NaN or infinite values; a mask holds 0/1")
    return t


@dataclass
class Hints:
    """Recipe facts an adapter may know; every field optional. `Hints.of(mapping)` refuses a name
    that is not a field, so a renamed hint fails loudly instead of silently skipping a probe."""

    max_length: int | None = None  # the max_length rows were cut to (tokenizer / SFTConfig / recipe)
    model_max_length: int | None = None
    prompt_lengths: list[int] | None = None  # per row: tokens of the prompt (the rest is the answer)
    # the raw example of each row, {"prompt": str, "response": str} or {"messages": [...]}, for template checks
    examples: list[dict[str, Any]] | None = None
    response_template: str | None = None  # the text that opens the answer (TRL's response_template)
    answer_marker: str | None = None  # the final-answer line's marker (GSM8K: "####")
    prompt_supervised_on_purpose: bool = False  # the recipe trains on the prompt deliberately
    compute_dtype: str | None = None  # the dtype training computes in (train --fix)
    checkpoint_dtype: str | None = None  # the dtype the checkpoint was saved in
    training: dict[str, Any] | None = None  # what sftdoctor-train.json says of the run (diagnose)
    labels_evidence: str | None = None  # how watch decided which tensor held the labels

    @classmethod
    def of(cls, value: "Hints | Mapping[str, Any] | None") -> "Hints":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"unknown hint {unknown[0]!r}; hints are: {', '.join(sorted(known))}")
        return cls(**dict(value))


# What a probe may declare in `needs` (checked when the registry loads, sftdoctor.engine). The
# step-level parts are present when the observer saw them in this step (ProbeContext.observed).
STEP_PARTS = ("forward_stats", "logits_grad", "backward")
NEEDS = ("batch", "labels", "attention_mask", "position_ids", "tokenizer", "model", "step", "run", "checkpoint",
         "dataset", "examples") + STEP_PARTS


@dataclass
class ProbeContext:
    """What probes read. Every part is optional; a probe declares what it `needs` and the
    engine marks it skipped (with the reason) when a part is missing."""

    batch: Batch | None = None
    tokenizer: TokenizerInfo | None = None
    model: ModelInfo | None = None
    hints: Hints = field(default_factory=Hints)  # a mapping given here is checked and converted
    # Filled by later levels (step hooks, run history, checkpoint loader).
    step: StepRecord | None = None
    run: RunHistory | None = None
    checkpoint: CheckpointRecord | None = None
    dataset: dict[str, Any] | None = None  # whole-dataset statistics (sftdoctor.dataset) for dataset-level probes
    observed: frozenset[str] = frozenset()  # which STEP_PARTS the observer saw in this step
    why_missing: dict[str, str] = field(default_factory=dict)  # need -> why it is missing in this run
    step_index: int = 0
    rank: int | None = None
    _classes: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.hints = Hints.of(self.hints)
        bad = [n for n in (*self.observed, *self.why_missing) if n not in NEEDS]
        if bad:
            raise ValueError(f"unknown context part {bad[0]!r}; parts are {NEEDS}")

    @property
    def token_classes(self):
        """Per-position TokenClass codes [B, T], computed once (see sftdoctor.tokens)."""
        if self._classes is None and self.batch is not None:
            self._classes = classify(self.batch, self.tokenizer)
        return self._classes

    def has(self, need: str) -> bool:
        b = self.batch
        if need in STEP_PARTS:
            return need in self.observed
        return {
            "batch": b is not None,
            "labels": b is not None and b.labels is not None,
            "attention_mask": b is not None and b.attention_mask is not None,
            "position_ids": b is not None and b.position_ids is not None,
            "tokenizer": self.tokenizer is not None,
            "model": self.model is not None,
            "step": self.step is not None,
            "run": self.run is not None,
            "checkpoint": self.checkpoint is not None,
            "dataset": self.dataset is not None,
            "examples": bool(self.hints.examples),
        }[need]  # KeyError: a need outside NEEDS, which the registry refuses at load
