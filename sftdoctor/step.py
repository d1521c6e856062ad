"""One probed training step on a given batch, for `inspect_batch(..., model=model)`: a forward and a
backward with every step probe on, NO optimizer update, and the model's .grad and train/eval
mode restored afterwards."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .attach import Doctor
from .constants import IGNORE_INDEX
from .context import ProbeContext

if TYPE_CHECKING:
    from .session import Session


def _masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy with the HF shift: logits[t] is scored against labels[t + 1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def probe_step(session: "Session", ctx: ProbeContext, model: torch.nn.Module) -> None:
    """Run one forward + backward of `model` on `ctx.batch` under the step probes and merge the step
    findings, checks and metrics into the session's report. Labels are passed to the model when the
    batch has them (else a masked cross-entropy over attended tokens is computed here)."""
    b = ctx.batch
    report = session.report
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    was_training = model.training
    doctor = Doctor(model, ctx.tokenizer, every=1, full_steps=1 << 30, ignore=session.ignore, command=report.command,
                    registry=session.registry)
    try:
        for p in params:
            p.grad = None
        model.train()
        kwargs = {"input_ids": b.input_ids.to(device)}
        if b.attention_mask is not None:
            kwargs["attention_mask"] = b.attention_mask.to(device)
        if b.position_ids is not None:
            kwargs["position_ids"] = b.position_ids.to(device)
        labels = b.labels
        if labels is None:
            labels = b.input_ids.masked_fill(b.attention_mask == 0, IGNORE_INDEX) if b.attention_mask is not None else b.input_ids
        with torch.enable_grad():
            if b.labels is not None:
                out = model(**kwargs, labels=labels.to(device))
                loss = out.loss
            else:
                out = model(**kwargs)
                logits = getattr(out, "logits", out)
                loss = _masked_ce(logits, labels.to(device))
            if loss is not None and loss.requires_grad:
                loss.backward()
        del out, loss
        step_report = doctor.report()
    except Exception as e:  # the model could not run this batch: say so, never crash inspect-batch
        session.skip("step", f"step probe could not run: {type(e).__name__}: {e}"[:300])
        return
    finally:
        doctor.detach()
        for p, g in zip(params, saved_grads):
            p.grad = g
        model.train(was_training)
    session.merge(step_report, metrics=("steps", "activations", "fp16_forecast", "argmax_histogram", "effective_targets", "dtypes"))
    # Token-view extras from the step, aligned like labels (value at position i: logits row i - 1).
    extra_keys = ("effective_target", "token_loss", "grad_norm")
    by_row = {s["row"]: s for s in step_report.samples}
    for s in report.samples:
        got = by_row.get(s.get("row"))
        if got is not None:
            for k in extra_keys:
                if k in got:
                    s[k] = got[k]
