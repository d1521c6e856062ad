"""The Python API for batch-level inspection: `sftdoctor.inspect_batch(batch, tokenizer)`."""
from __future__ import annotations

import platform
import sys
from typing import Any, Mapping

import torch

from .context import IGNORE_INDEX, Batch, ModelInfo, ProbeContext, TokenizerInfo
from .engine import run_probes
from .findings import CheckResult
from .report import Report
from .tokens import class_table

SAMPLE_ROWS = 4  # token-view rows kept in a report
SAMPLE_TOKENS = 1024  # tokens kept per row (the view collapses long runs)


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "sftdoctor": ver("sftdoctor"),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "argv": list(sys.argv),
    }
    return {k: v for k, v in env.items() if v is not None}


def make_context(batch: Any, tokenizer: Any = None, model: Any = None, *, hints: Mapping[str, Any] | None = None) -> ProbeContext:
    """Build a ProbeContext from user objects (collator dict, HF tokenizer, HF model or config)."""
    b = batch if isinstance(batch, Batch) else Batch.from_mapping(batch)
    tok = tokenizer if isinstance(tokenizer, TokenizerInfo) or tokenizer is None else TokenizerInfo.from_tokenizer(tokenizer)
    info = None
    if isinstance(model, ModelInfo):
        info = model
    elif model is not None and hasattr(model, "get_input_embeddings"):
        info = ModelInfo.from_model(model)
    elif model is not None and hasattr(model, "vocab_size"):
        info = ModelInfo.from_config(model)
    return ProbeContext(batch=b, tokenizer=tok, model=info, hints=dict(hints or {}))


def token_samples(ctx: ProbeContext, rows: int = SAMPLE_ROWS, extra: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Token-view rows for renderers: ids, token texts, classes, labels (and any per-token extras)."""
    b, tok, classes = ctx.batch, ctx.tokenizer, ctx.token_classes
    out = []
    # Prefer rows that hold findings' evidence? Keep it simple: the first rows.
    for r in range(min(rows, b.input_ids.shape[0])):
        ids = b.input_ids[r, :SAMPLE_TOKENS].tolist()
        if tok is not None and tok.convert_ids_to_tokens is not None:
            texts = [tok.token_text(i) for i in ids]
        else:
            texts = [str(i) for i in ids]
        row = {
            "row": r,
            "ids": ids,
            "texts": texts,
            "classes": classes[r, :SAMPLE_TOKENS].tolist(),
            "labels": b.labels[r, :SAMPLE_TOKENS].tolist() if b.labels is not None else None,
            "attention": b.attention_mask[r, :SAMPLE_TOKENS].tolist() if b.attention_mask is not None else None,
            "length": int(b.input_ids.shape[1]),
        }
        for name, t in (extra or {}).items():
            row[name] = t[r, :SAMPLE_TOKENS].tolist()
        out.append(row)
    return out


def batch_metrics(ctx: ProbeContext) -> dict[str, Any]:
    b = ctx.batch
    B, T = b.input_ids.shape
    m: dict[str, Any] = {"batch": {"rows": B, "seq_len": T, "labels_source": b.labels_source}}
    m["token_classes"] = class_table(b, ctx.token_classes)
    if b.labels is not None:
        m["batch"]["supervised_tokens"] = int((b.labels != IGNORE_INDEX).sum())
    if ctx.tokenizer is not None:
        t = ctx.tokenizer
        m["tokenizer"] = {
            "class": t.class_name, "name": t.name_or_path, "pad_id": t.pad_id, "pad_token": t.pad_token,
            "eos_ids": sorted(t.eos_ids), "eos_token": t.eos_token, "bos_id": t.bos_id, "len": t.vocab_len,
            "padding_side": t.padding_side,
        }
    if ctx.model is not None:
        m["model"] = {k: v for k, v in vars(ctx.model).items() if v not in (None, "")}
    return m


def inspect_batch(batch: Any, tokenizer: Any = None, model: Any = None, *, hints: Mapping[str, Any] | None = None,
                  ignore: set[str] | frozenset[str] = frozenset(), command: str = "inspect-batch") -> Report:
    """Run every batch-level probe on one collated batch and return the Report.

    batch: the dict a collator returns (input_ids, attention_mask, labels with -100, or a
    loss_mask; optional position_ids). tokenizer: an HF tokenizer. model: an HF model or config
    (optional: enables the embedding-size check and, for a model, the step probes).
    """
    from sftdoctor.probes import BATCH

    ctx = make_context(batch, tokenizer, model, hints=hints)
    report = Report(command=command, environment=environment())
    if ctx.batch.input_ids.numel() == 0:
        # nothing to look at: every check is skipped and the verdict is inconclusive, never a pass
        B, T = (tuple(ctx.batch.input_ids.shape) + (0, 0))[:2]
        report.record_checks(CheckResult(i, "skipped", f"empty batch ({B} rows x {T} tokens)", p.level)
                             for p in BATCH for i in p.ids)
        report.run["note"] = f"the batch is empty ({B} rows x {T} tokens)"
        report.metrics["batch"] = {"rows": B, "seq_len": T}
        return report
    findings, checks = run_probes(ctx, BATCH, ignore=ignore)
    report.add(findings)
    report.record_checks(checks)
    report.metrics.update(batch_metrics(ctx))
    report.samples = token_samples(ctx)
    if model is not None and hasattr(model, "parameters"):
        try:
            from .step import probe_step  # step-level probes (one forward + backward, no update)
        except ImportError:
            pass
        else:
            probe_step(report, ctx, model, batch, ignore=ignore)
    return report
