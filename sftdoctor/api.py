"""The Python API for batch-level inspection: `sftdoctor.inspect_batch(batch, tokenizer)`."""
from __future__ import annotations

from typing import Any, Mapping

from .context import Batch, Hints, ModelInfo, ProbeContext, TokenizerInfo
from .engine import Registry
from .probes import REGISTRY
from .report import Report
from .session import Session, batch_metrics, token_samples
from .step import probe_step


def make_context(batch: Any, tokenizer: Any = None, model: Any = None, *, hints: Mapping[str, Any] | Hints | None = None,
                 why_missing: Mapping[str, str] | None = None) -> ProbeContext:
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
    return ProbeContext(batch=b, tokenizer=tok, model=info, hints=Hints.of(hints), why_missing=dict(why_missing or {}))


def inspect_batch(batch: Any, tokenizer: Any = None, model: Any = None, *, hints: Mapping[str, Any] | Hints | None = None,
                  ignore: set[str] | frozenset[str] = frozenset(), command: str = "inspect-batch",
                  why_missing: Mapping[str, str] | None = None, registry: Registry = REGISTRY) -> Report:
    """Run every batch-level probe on one collated batch and return the Report.

    batch: the dict a collator returns (input_ids, attention_mask, labels with -100, or a
    loss_mask; optional position_ids). tokenizer: an HF tokenizer. model: an HF model or config
    (optional: enables the embedding-size check and, for a model, the step probes).
    hints: recipe facts (sftdoctor.context.Hints fields, e.g. {"max_length": 512}).
    registry: the probes to run (default: all of sftdoctor.probes).
    """
    ctx = make_context(batch, tokenizer, model, hints=hints, why_missing=why_missing)
    session = Session(command, registry, ignore=ignore)
    report = session.report
    if ctx.batch.input_ids.numel() == 0:
        # nothing to look at: every check is skipped and the verdict is inconclusive, never a pass
        B, T = (tuple(ctx.batch.input_ids.shape) + (0, 0))[:2]
        session.skip("batch", f"empty batch ({B} rows x {T} tokens)")
        report.run["note"] = f"the batch is empty ({B} rows x {T} tokens)"
        report.metrics["batch"] = {"rows": B, "seq_len": T}
        return session.finish()
    session.check(ctx, "batch")
    report.metrics.update(batch_metrics(ctx))
    report.samples = token_samples(ctx)
    if model is not None and hasattr(model, "parameters"):
        probe_step(session, ctx, model)  # step-level probes: one forward + backward, no update
    return session.finish()
