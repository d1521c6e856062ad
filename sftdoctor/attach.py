"""`sftdoctor.attach(model_or_trainer)`: step probes on a REAL training loop.

    doctor = sftdoctor.attach(model, tokenizer)        # or attach(trainer)
    for batch in loader:
        loss = my_loss(model(**batch).logits, batch)    # any loss, labels passed or not
        loss.backward(); opt.step(); opt.zero_grad()
    doctor.report().save("run.json"); doctor.detach()

A Doctor joins two parts: a StepObserver (sftdoctor.observer: hooks that measure each micro-step,
knowing no probe) and a Session (sftdoctor.session: runs the step and run probes on what was
measured and owns the Report). The Doctor is the observer's sink.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from . import internal
from .context import ProbeContext, TokenizerInfo
from .engine import Registry
from .errors import UserError
from .findings import Finding
from .frames import trainer_tokenizer
from .observer import STEP_CHECKS, ObservedStep, StepObserver, merge_activations
from .probes import REGISTRY
from .report import Report
from .session import Session, token_samples


class Doctor:
    """The step probes attached to one model: an observer and the Session that judges its steps. See attach()."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, optimizer: Any = None, every: int = 50,
                 full_steps: int = 3, ignore: Iterable[str] = (), on_finding: Callable | None = None,
                 on_step: Callable | None = None, command: str = "attach", rank: int | None = None,
                 registry: Registry = REGISTRY):
        self.on_finding = on_finding  # called with each new finding, at a safe point
        self.on_step = on_step  # called with each micro-step's metrics row, at a safe point
        self.observer = StepObserver(model, self, tokenizer, optimizer=optimizer, every=every, full_steps=full_steps,
                                     rank=rank)
        self.session = Session(command, registry, ignore=ignore, rank=self.observer.rank)
        self._trainer: Any = None
        self._callback: Any = None

    # ---- what the observer measured --------------------------------------------------------------
    model = property(lambda self: self.observer.model)
    tokenizer = property(lambda self: self.observer.tokenizer)
    model_info = property(lambda self: self.observer.model_info)
    rank = property(lambda self: self.observer.rank)
    records = property(lambda self: self.observer.records)  # report.metrics["steps"] rows, one per micro-step
    optimizer_steps = property(lambda self: self.observer.optimizer_steps)
    history = property(lambda self: self.observer.history)
    errors = property(lambda self: self.observer.errors)  # sftdoctor's own errors (never raised into training)
    # (Batch, labels) of the first full step with a measured d loss / d logits: the labels the loss really used
    gradient_labels = property(lambda self: self.observer.gradient_labels)

    @property
    def findings(self) -> list[Finding]:
        return list(self.session.report.findings)

    # ---- StepSink: judging each observed step --------------------------------------------------------
    def step_observed(self, step: ObservedStep) -> bool:
        ctx = self._context(step.record, step.batch, step.observed, step.why_missing)
        new = self._check(ctx, "step", STEP_CHECKS) + self._run_checks()
        self._notify(new)
        if self.on_step is not None:
            self.on_step(step.row)
        return bool(new)

    def optimizer_stepped(self) -> bool:
        new = self._run_checks()
        self._notify(new)
        return bool(new)

    def _context(self, record, batch, observed: frozenset[str] = frozenset(), why_missing: dict | None = None) -> ProbeContext:
        obs = self.observer
        return ProbeContext(batch=batch, tokenizer=obs.tokenizer, model=obs.model_info, observed=observed,
                            why_missing=why_missing or {}, step=record, run=obs.history,
                            step_index=record.step if record else obs.micro_steps, rank=obs.rank)

    def _check(self, ctx: ProbeContext, level: str, affects: Iterable[str]) -> list[Finding]:
        try:
            return self.session.check(ctx, level)
        except Exception:  # our bug: recorded as an internal error, never raised into the user's training
            self.observer.record_error(f"the {level} probes", affects)
            return []

    def _run_checks(self) -> list[Finding]:
        history = self.observer.history
        last = history.records[-1] if history.records else None
        new = self._check(self._context(last, None), "run", [i for p in self.session.registry.at("run") for i in p.ids])
        history.checked_records = len(history.records)
        history.checked_optimizer_steps = len(history.optimizer_steps)
        return new

    def _notify(self, new: list[Finding]) -> None:
        if self.on_finding is not None:
            for f in new:
                self.on_finding(f)

    # ---- public API ---------------------------------------------------------------------------
    def report(self) -> Report:
        """Run the run-level probes, fill the metrics and return the Report (callable many times)."""
        self.observer.flush()
        new = self._run_checks()
        self._fill_metrics()
        if new:
            self.observer.force_full_next()
        self._notify(new)
        return self.session.finish()

    def detach(self) -> None:
        """Remove every hook and patch (idempotent). A step still pending is observed first."""
        try:
            self.observer.detach()
        finally:
            if self._trainer is not None and self._callback is not None:
                try:
                    self._trainer.remove_callback(self._callback)
                except Exception:
                    pass
                self._callback = None

    def __enter__(self) -> "Doctor":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---- report metrics ---------------------------------------------------------------------------
    def _fill_metrics(self) -> None:
        obs, report = self.observer, self.session.report
        m = report.metrics
        m["steps"] = list(obs.records)
        m["optimizer_steps"] = obs.optimizer_steps
        if obs.history.scaler_seen:
            m["loss_scale"] = {"scales": obs.history.scales[-200:],
                               "skipped": sum(1 for o in obs.history.optimizer_steps if o.skipped)}
        full = obs.latest_full
        if full is not None:
            m["activations"] = merge_activations(full.activations)
            if full.activations and all(r["module"] in ("logits", obs.output_name) for r in full.activations):
                # hooks inside a torch.compile'd forward never run: say what was not observed
                m["activations_not_observed"] = ("per-module activations were not observed (a torch.compile'd forward: "
                                                 "module hooks inside the compiled graph do not run); the precision "
                                                 "checks read the logits only")
            if full.fp16_forecast is not None:
                m["fp16_forecast"] = full.fp16_forecast
            if full.argmax is not None:
                m["argmax_histogram"] = [{"token_id": h["token_id"], "text": h.get("text", ""), "share": h["share"]}
                                         for h in full.argmax["histogram"]]
            if full.targets is not None:
                m["effective_targets"] = dict(full.targets, step=full.step)
            m["dtypes"] = full.dtypes
        if obs.latest_samples is not None:
            ctx = ProbeContext(batch=obs.latest_samples["batch"], tokenizer=obs.tokenizer)
            report.samples = token_samples(ctx, extra=obs.latest_samples["extra"])
        for e in obs.errors:
            internal.add(report, e)


def _trainer_callback(observer: StepObserver):
    from transformers import TrainerCallback

    class SftdoctorCallback(TrainerCallback):
        """Added by sftdoctor.attach(trainer): hands the optimizer over and closes the last step."""

        def on_train_begin(self, args, state, control, **kwargs):
            observer.adopt_optimizer(kwargs.get("optimizer"))

        def on_train_end(self, args, state, control, **kwargs):
            observer.close_step()

    return SftdoctorCallback()


def attach(obj: Any, tokenizer: Any = None, *, optimizer: Any = None, every: int = 50, full_steps: int = 3,
           ignore: Iterable[str] = (), on_finding: Callable | None = None, on_step: Callable | None = None,
           command: str = "attach", rank: int | None = None, registry: Registry = REGISTRY) -> Doctor:
    """Attach the step probes to a model (any nn.Module returning .logits or the logits tensor) or
    to an HF Trainer (its model, tokenizer and optimizer are used; a callback is added for you).

    every / full_steps: the full probe set runs on the first `full_steps` optimizer steps (micro-steps
    until an optimizer step is seen), then every `every` steps, and right after any new finding;
    the other steps get the cheap checks (loss finite, global grad norm, optimizer/scaler bookkeeping).
    """
    trainer = None
    if hasattr(obj, "add_callback") and hasattr(obj, "model") and hasattr(obj, "args"):
        trainer = obj
        model = obj.model
        if tokenizer is None:
            tokenizer = trainer_tokenizer(obj)[0] or getattr(obj, "tokenizer", None)
        if optimizer is None:
            optimizer = getattr(obj, "optimizer", None)
    elif isinstance(obj, torch.nn.Module):
        model = obj
    else:
        raise UserError(f"sftdoctor.attach() needs a torch model or a transformers Trainer, not a {type(obj).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, TokenizerInfo) and not hasattr(tokenizer, "convert_ids_to_tokens"):
        tokenizer = getattr(tokenizer, "tokenizer", None)  # a processor wrapping a tokenizer
    doctor = Doctor(model, tokenizer, optimizer=optimizer, every=every, full_steps=full_steps, ignore=ignore,
                    on_finding=on_finding, on_step=on_step, command=command, rank=rank, registry=registry)
    if trainer is not None:
        doctor._trainer = trainer
        doctor._callback = _trainer_callback(doctor.observer)
        trainer.add_callback(doctor._callback)
    return doctor


__all__ = ["Doctor", "attach", "STEP_CHECKS"]
