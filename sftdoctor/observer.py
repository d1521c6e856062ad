"""The observer: what one training step did, measured from hooks, with no judgment.

A micro-step is one forward of the observed module with grad enabled. It is observed from the
root forward pre-hook (batch, sampling decision) to the end of the backward (the wrapped
torch.Tensor.backward returns), then reduced with ONE host transfer into a StepRecord and handed to
the sink (`StepSink`: in sftdoctor.attach, a Session that runs the step probes). The observer knows
no probe and no Report. The sink is called only at safe points (end of .backward(), start of the
next forward, optimizer step hooks, flush(), detach()), never inside an autograd hook, so whatever
it raises reaches the user's script.
"""
from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from . import hooks, internal, patches
from .constants import IGNORE_INDEX
from .context import Batch, ModelInfo, TokenizerInfo
from .stepstats import (FP16_MAX, HEADROOM_FACTOR, OptimizerStep, RunHistory, StepRecord, analyze_tokens, same_device,
                        candidate_targets, dtype_limit, dtype_name, logits_forward_stats, logits_grad_stats, to_host,
                        local_tensor, is_sharded)

# the checks an error in a hook affects (named in the internal error, so the report says which did not really run)
STEP_CHECKS = ("loss-nonfinite", "logits-nonfinite", "grad-nonfinite", "params-frozen", "precision-overflow",
               "grad-from-ignored-tokens", "labels-misaligned")
GRADIENT_CHECKS = ("grad-from-ignored-tokens", "labels-misaligned", "labels-eos-missing", "logits-nonfinite")


@dataclass
class ObservedStep:
    """One micro-step as the observer saw it: what the sink judges."""

    record: StepRecord
    batch: Batch | None  # CPU copy of the batch (full steps only)
    row: dict[str, Any]  # report.metrics["steps"] row
    observed: frozenset[str]  # which of context.STEP_PARTS were seen (forward_stats, logits_grad, backward)
    why_missing: dict[str, str]  # part -> why it was not seen in this step


class StepSink(Protocol):
    """Where the observer sends what it measured. Both calls happen at safe points; a True return
    means "something was found": the next steps are then observed fully."""

    def step_observed(self, step: ObservedStep) -> bool: ...

    def optimizer_stepped(self) -> bool: ...


@dataclass
class _Pending:
    """A micro-step between its forward and the end of its backward (device tensors only)."""

    step: int
    full: bool
    batch: Batch | None = None  # CPU copy of the batch (full steps only)
    device_ids: torch.Tensor | None = None  # only until the forward ends
    device_labels: torch.Tensor | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-d device tensors
    fwd: dict[str, torch.Tensor] = field(default_factory=dict)
    grad: dict[str, torch.Tensor] = field(default_factory=dict)
    logits_ref: Any = None  # weakref: never keeps the logits alive
    logits_dtype: str | None = None
    logits_requires_grad: bool | None = None
    logits_grad_seen: bool = False
    backward_seen: bool = False
    forward_done: bool = False
    autocast_dtype: str | None = None
    logits_module: str = "logits"  # name of the module whose output is the logits (lm_head)
    no_logits: str | None = None  # why no logits were seen in this forward (fused LM head, ...)
    grad_source: str | None = None  # "logits" (the returned logits) | "lm_head" (its output, under a wrapper)


class StepObserver:
    """Hooks on one model (and, through sftdoctor.patches.STEP, on backward, GradScaler and the
    optimizer step) that build one StepRecord per micro-step and send it to `sink`."""

    def __init__(self, model: torch.nn.Module, sink: StepSink, tokenizer: Any = None, *, optimizer: Any = None,
                 every: int = 50, full_steps: int = 3, rank: int | None = None):
        self.model = model
        self.tokenizer = (tokenizer if isinstance(tokenizer, TokenizerInfo) or tokenizer is None
                          else TokenizerInfo.from_tokenizer(tokenizer))
        self.model_info = ModelInfo.from_model(model) if hasattr(model, "config") else None
        self.every = int(every)
        self.full_steps = int(full_steps)
        self.sink = sink
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        self.rank = rank
        self.records: list[dict[str, Any]] = []  # report.metrics["steps"] rows, one per micro-step
        self.optimizer_steps = 0  # optimizer step attempts (GradScaler-skipped ones included)
        self.history = RunHistory()
        self.errors: list[dict] = []  # internal errors of sftdoctor itself (never raised into training), see internal.py
        # (Batch, labels) of the first full step with a measured d loss / d logits: the labels the loss
        # really used (-100 where no loss), HF-aligned. Read by watch to judge labels it had to guess.
        self.gradient_labels: tuple[Batch, torch.Tensor] | None = None
        self._named_params = list(model.named_parameters())
        self._param_ids = {id(p) for _, p in self._named_params}
        optimizer = _unwrap_optimizer(optimizer)
        self._opt_ref = weakref.ref(optimizer) if optimizer is not None else None
        self._foreign_optimizers: weakref.WeakSet = weakref.WeakSet()
        self._micro = 0
        self._pending: _Pending | None = None
        self._in_forward = False
        self._seen_optimizer = False
        self._forced_until = -1
        self._current_micro: list[int] = []
        self._opt_fired = False
        self._scaled_ref = None
        self._scale_t: torch.Tensor | None = None
        self._scaler_ref = None
        self.latest_full: StepRecord | None = None  # the latest fully observed step (its activations kept)
        self.latest_samples: dict[str, Any] | None = None  # its batch and per-token extras, for the token view
        self._detached = False
        self._structure = self._structure_key()
        self._collector = hooks.ActivationCollector(model, self._output_module())
        try:
            self._signature = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._signature = None
        # eager even around a torch.compile'd model (the root's hooks run outside its compiled forward)
        self._handles = [
            model.register_forward_pre_hook(hooks.eager(self._on_forward_start), with_kwargs=True),
            model.register_forward_hook(hooks.eager(self._on_forward_end), with_kwargs=True),
        ]
        patches.STEP.acquire(self)  # backward, GradScaler and optimizer events (StepEvents below)

    # ---- public API ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Send a micro-step whose backward already ran (a loop that ended without another forward)."""
        if self._pending is not None and (self._pending.backward_seen or self._pending.logits_grad_seen):
            self._finalize_pending()

    def close_step(self) -> None:
        """The training loop ended (Trainer's on_train_end): send the step whose forward ran."""
        if self._pending is not None and self._pending.forward_done:
            self._finalize_pending()

    def adopt_optimizer(self, optimizer: Any) -> None:
        """The optimizer the loop uses, once known (a Trainer creates it in train())."""
        opt = _unwrap_optimizer(optimizer)
        if opt is not None and (self._opt_ref is None or self._opt_ref() is None):
            self._opt_ref = weakref.ref(opt)

    @property
    def observing_fully(self) -> bool:
        """Whether the micro-step in flight (its forward has started) is a fully observed one."""
        return self._pending is not None and self._pending.full

    def force_full_next(self) -> None:
        """Observe the next steps fully (right after an anomaly)."""
        self._forced_until = max(self._forced_until, self._key() + 1)

    @property
    def micro_steps(self) -> int:
        return self._micro

    @property
    def named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self._named_params

    @property
    def output_name(self) -> str:
        return self._collector.output_name

    def detach(self) -> None:
        """Remove every hook and patch (idempotent). A step still pending is observed first."""
        if self._detached:
            return
        try:
            if self._pending is not None and self._pending.forward_done:
                self._finalize_pending()
        finally:
            self._detached = True
            for h in self._handles:
                h.remove()
            self._handles = []
            self._collector.remove()
            patches.STEP.release(self)
            self._pending = None

    # ---- following what the script swaps -----------------------------------------------------
    def _output_module(self) -> torch.nn.Module | None:
        try:
            out = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        except Exception:
            out = None
        return out if isinstance(out, torch.nn.Module) else None

    def _structure_key(self) -> tuple:
        """What changes when the script swaps parts of the model after attach: the parameter
        objects (resize_token_embeddings, PEFT, a re-created head) and the output module."""
        out = self._output_module()
        return (tuple(id(p) for p in self.model.parameters()), id(out) if out is not None else None)

    def _refresh(self) -> None:
        """Follow the model as it is NOW (invariant: probes never read a parameter or a module the
        script has replaced). Cheap: one pass over the parameter list per forward."""
        key = self._structure_key()
        if key == self._structure:
            return
        self._structure = key
        self._named_params = list(self.model.named_parameters())
        self._param_ids = {id(p) for _, p in self._named_params}
        if self._opt_ref is not None and self._opt_ref() is not None:
            opt = self._opt_ref()
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            if not held & self._param_ids:
                self._opt_ref = None  # it holds none of the current parameters: adopt the next one that does
        self._foreign_optimizers = weakref.WeakSet()
        self._collector.remove()
        self._collector = hooks.ActivationCollector(self.model, self._output_module())
        if hasattr(self.model, "config"):
            try:
                self.model_info = ModelInfo.from_model(self.model)
            except Exception:
                self.record_error("model info", ())

    # ---- sampling -----------------------------------------------------------------------------
    def _key(self) -> int:
        return self.optimizer_steps if self._seen_optimizer else self._micro

    def _should_be_full(self) -> bool:
        k = self._key()
        return k < self.full_steps or (self.every > 0 and k % self.every == 0) or k <= self._forced_until

    # ---- forward ------------------------------------------------------------------------------
    def _on_forward_start(self, module, args, kwargs):
        if self._detached or not torch.is_grad_enabled() or hooks.compiling():
            return None
        try:
            self._refresh()
        except Exception:
            self.record_error("following the model's parameters", ("params-frozen",))
        if self._in_forward:  # the previous forward raised before returning: drop what it started
            self._in_forward = False
            self._pending = None
            self._collector.forward_on = self._collector.backward_on = False
            self._collector.take()
        if self._pending is not None:
            self._finalize_pending()  # safe point: the previous micro-step is complete
        full = self._should_be_full()
        pend = _Pending(step=self._micro, full=full)
        self._micro += 1
        named = dict(kwargs)
        if args and self._signature is not None:
            try:  # positional arguments by the forward's own parameter names
                named = dict(self._signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        ids = named.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        labels = named.get("labels")
        am = named.get("attention_mask")
        if not isinstance(labels, torch.Tensor) or ids is None or labels.shape != ids.shape:
            labels = None
        if labels is not None:
            # cheap every step: supervised tokens as HF counts them (labels[t + 1] != -100)
            per_row = (labels[:, 1:] != IGNORE_INDEX).sum(1)
            pend.tensors["supervised"] = per_row.sum()
            pend.tensors["empty_rows"] = (per_row == 0).sum()
            n_items = kwargs.get("num_items_in_batch")
            if isinstance(n_items, (int, float, torch.Tensor)):  # HF Trainer: loss = token-loss sum / n_items
                pend.tensors["num_items"] = torch.as_tensor(n_items).detach().float().reshape(-1)[:1].reshape(())
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            pend.device_ids, pend.device_labels = ids, labels
            if full:  # copied to the host with the step's statistics (one transfer), see _build_record
                pend.tensors["batch.input_ids"] = ids.detach()
                if isinstance(am, torch.Tensor) and am.shape == ids.shape:
                    pend.tensors["batch.attention_mask"] = am.detach()
                if labels is not None:
                    pend.tensors["batch.labels"] = labels.detach()
        dev = ids.device.type if isinstance(ids, torch.Tensor) else "cpu"
        try:
            if torch.is_autocast_enabled(dev):
                pend.autocast_dtype = dtype_name(torch.get_autocast_dtype(dev))
        except Exception:
            pass
        self._collector.output_ref = None  # only this forward's lm_head output
        self._pending = pend
        self._in_forward = True
        self._collector.forward_on = full
        self._collector.backward_on = full
        return None

    def _on_forward_end(self, module, args, kwargs, output):
        pend = self._pending
        if not self._in_forward or pend is None or hooks.compiling():
            return None
        self._in_forward = False
        self._collector.forward_on = False
        pend.forward_done = True
        try:
            loss = getattr(output, "loss", None)
            if loss is None and isinstance(output, dict):
                loss = output.get("loss")
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                pend.tensors["model_loss"] = loss.detach().float().reshape(())
            logits = hooks.logits_of(output)
            if logits is None:
                pend.no_logits = ("TRL's fused LM head (fused_lm_head=True) returns per-token log-probabilities, never the "
                                  "logits, so d loss / d logits cannot be measured in this step"
                                  if getattr(output, "log_probs", None) is not None else
                                  "the model returned no logits in this step (hidden states only?)")
            if logits is not None:
                pend.logits_dtype = dtype_name(logits.dtype)
                pend.logits_requires_grad = bool(logits.requires_grad)
                lm_ref, self._collector.output_ref = self._collector.output_ref, None
                lm_out = lm_ref
                if pend.full:
                    cands = None
                    if pend.device_ids is not None and tuple(pend.device_ids.shape) == tuple(logits.shape[:2]):
                        pad = self.tokenizer.pad_id if self.tokenizer is not None else None
                        cands = candidate_targets(pend.device_ids, pend.device_labels, pad)
                    pend.fwd = logits_forward_stats(logits, cands)
                    pend.logits_ref = weakref.ref(logits)
                    pend.logits_module = self._collector.output_name if lm_out is logits else "logits"
                if logits.requires_grad:
                    logits.register_hook(self._logits_grad_hook(pend, "logits"))
                # A wrapper may hand the caller a COPY of the logits (accelerate's convert_outputs_to_fp32
                # under Trainer/TRL bf16/fp16): a loss computed inside the model (labels passed) never
                # touches the copy. The lm_head's own output is upstream of every use, so its gradient
                # is recorded when the copy's gradient never arrives (invariant: the hook sits on a
                # tensor the loss's graph contains).
                if (isinstance(lm_out, torch.Tensor) and lm_out is not logits and lm_out.requires_grad
                        and tuple(lm_out.shape) == tuple(logits.shape)):
                    lm_out.register_hook(self._logits_grad_hook(pend, "lm_head"))
                    if lm_out.dtype != logits.dtype and pend.autocast_dtype is None and lm_out.dtype in (torch.bfloat16, torch.float16):
                        pend.autocast_dtype = dtype_name(lm_out.dtype)  # autocast entered inside the wrapper
                    pend.logits_dtype = dtype_name(lm_out.dtype)
        except Exception:
            self.record_error("the logits hook (end of forward)", ("logits-nonfinite", "prediction-collapse", "precision-overflow")
                        + GRADIENT_CHECKS)
        # no reference to the batch beyond the forward, except a sampled step's own ids/mask/labels
        # (pend.tensors), which leave with its one host transfer at the end of the backward
        pend.device_ids = pend.device_labels = None
        return None

    def _logits_grad_hook(self, pend: _Pending, source: str) -> Callable:
        def hook(grad):
            # autograd hook: record only (no callbacks, nothing raised). The returned logits' gradient
            # arrives first in backward; the lm_head output's only matters when that one never came.
            pend.logits_grad_seen = True
            if pend.full and not pend.grad:
                try:
                    logits = pend.logits_ref() if pend.logits_ref is not None else None
                    pend.grad = logits_grad_stats(grad, logits)
                    pend.grad_source = source
                except Exception:
                    self.record_error("the d loss / d logits hook", GRADIENT_CHECKS)
            return None
        return hook

    # ---- StepEvents (sftdoctor.patches.STEP calls these at safe points) ---------------------------
    # ---- backward (via the torch.Tensor.backward wrapper) --------------------------------------
    def before_backward(self, tensor: torch.Tensor) -> None:
        pend = self._pending
        if pend is None or not pend.forward_done or "backward_loss" in pend.tensors:
            return
        try:
            if tensor.numel() == 1 and tensor.is_floating_point():
                value = tensor.detach().float().reshape(())
                scaled = self._scaled_ref() if self._scaled_ref is not None else None
                if scaled is tensor and self._scale_t is not None:
                    value = value / self._scale_t.to(value.device).float().reshape(())  # undo GradScaler.scale
                pend.tensors["backward_loss"] = value
        except Exception:
            self.record_error("reading the loss given to .backward()", ("loss-nonfinite",))

    def after_backward(self, tensor: torch.Tensor) -> None:
        pend = self._pending
        if pend is None or not pend.forward_done:
            return
        pend.backward_seen = True
        self._finalize_pending()

    # ---- GradScaler (patched while attached) ----------------------------------------------------
    def scaler_scaled(self, scaler, outputs, out) -> None:
        try:
            if not scaler.is_enabled() or not isinstance(out, torch.Tensor):
                return
            self.history.scaler_seen = True
            self._scaler_ref = weakref.ref(scaler)
            self._scaled_ref = weakref.ref(out)
            self._scale_t = scaler._scale.detach().clone() if scaler._scale is not None else None
            if self._pending is not None and self._scale_t is not None:
                self._pending.tensors["scale"] = self._scale_t.float().reshape(())
        except Exception:
            self.record_error("the GradScaler hook", ("loss-scale-skipped-steps",))

    def scaler_step_begin(self, scaler, optimizer) -> None:
        self._opt_fired = False

    def scaler_step_end(self, scaler, optimizer) -> None:
        if not scaler.is_enabled() or not self._is_ours(optimizer):
            return
        if not self._opt_fired:  # GradScaler found inf/NaN grads and skipped optimizer.step()
            if self._pending is not None and self._pending.forward_done:
                self._finalize_pending()
            self._end_optimizer_step(optimizer, skipped=True)

    def scaler_updated(self, scaler) -> None:
        if not scaler.is_enabled() or (self._scaler_ref is not None and self._scaler_ref() is not scaler):
            return
        try:
            scale = float(scaler.get_scale())
        except Exception:
            return
        self.history.scales.append(scale)
        if self.history.optimizer_steps and self.history.optimizer_steps[-1].scale_after is None:
            self.history.optimizer_steps[-1].scale_after = scale

    # ---- optimizer (global step hooks) ----------------------------------------------------------
    def _is_ours(self, optimizer) -> bool:
        optimizer = _unwrap_optimizer(optimizer)
        if self._opt_ref is not None:
            known = self._opt_ref()
            if known is not None:
                return known is optimizer
            # the optimizer we knew was deleted (rebuilt after unfreezing?): adopt one holding our params
        if optimizer in self._foreign_optimizers:
            return False
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) in self._param_ids:
                    self._opt_ref = weakref.ref(optimizer)
                    return True
        self._foreign_optimizers.add(optimizer)  # another model's optimizer: not looked at again
        return False

    def optimizer_step_begin(self, optimizer) -> None:
        if not self._is_ours(optimizer):
            return
        self._opt_fired = True
        if self._pending is not None and self._pending.forward_done:
            self._finalize_pending()  # safe point; backward ran via torch.autograd.backward

    def optimizer_step_end(self, optimizer) -> None:
        if self._is_ours(optimizer):
            self._end_optimizer_step(optimizer, skipped=False)

    def _end_optimizer_step(self, optimizer, *, skipped: bool) -> None:
        lr = _lr(optimizer)
        ostep = OptimizerStep(index=self.optimizer_steps, micro_steps=list(self._current_micro), skipped=skipped, lr=lr)
        self.history.optimizer_steps.append(ostep)
        if self._current_micro:
            rec = self.history.record(self._current_micro[-1])
            if rec is not None:
                rec.optimizer_step = True
                rec.lr = lr
            for row in reversed(self.records):
                if row["step"] == self._current_micro[-1]:
                    row["optimizer_step"], row["lr"] = True, lr
                    break
        self._current_micro = []
        self.optimizer_steps += 1
        self._seen_optimizer = True
        if self.sink.optimizer_stepped():
            self.force_full_next()

    # ---- finalize one micro-step ----------------------------------------------------------------
    def _finalize_pending(self) -> None:
        pend, self._pending = self._pending, None
        if pend is None:
            return
        self._in_forward = False
        self._collector.forward_on = self._collector.backward_on = False
        try:
            record, extra = self._build_record(pend)
        except Exception:
            self.record_error(f"reducing step {pend.step}", STEP_CHECKS)
            self._collector.take()
            return
        self.history.add(record)
        self._current_micro.append(record.step)
        row = record.metrics_row()
        self.records.append(row)
        if record.full:
            if self.latest_full is not None:
                self.latest_full.activations = []  # keep per-module detail for the latest full step only
            self.latest_full = record
            if extra is not None:
                self.latest_samples = extra
                eff = (extra.get("extra") or {}).get("effective_target")
                if self.gradient_labels is None and eff is not None and record.targets is not None:
                    # what the loss trained on, measured: labels[i] = effective target of logits row i - 1
                    self.gradient_labels = (extra["batch"], eff.long())
        observed = {"forward_stats": bool(record.logits is not None or record.activations),
                    "logits_grad": record.targets is not None, "backward": record.backward_seen}
        why_missing = {}
        if pend.no_logits:
            why_missing["logits_grad"] = f"needs logits_grad: {pend.no_logits}"
            why_missing["forward_stats"] = f"needs forward_stats: {pend.no_logits}"
        elif pend.full and record.backward_seen and not pend.grad:
            why_missing["logits_grad"] = ("needs logits_grad: a backward ran but no gradient reached the logits this "
                                          "hook saw or the lm_head output (the loss did not use them?)")
        step = ObservedStep(record=record, batch=pend.batch, row=row,
                            observed=frozenset(k for k, v in observed.items() if v), why_missing=why_missing)
        if self.sink.step_observed(step):
            self.force_full_next()

    def _build_record(self, pend: _Pending) -> tuple[StepRecord, dict | None]:
        tensors = dict(pend.tensors)
        fwd_acts, bwd_acts = self._collector.take()
        if fwd_acts:
            tensors["act_fwd"] = torch.stack(same_device([v for _, _, v in fwd_acts]))
        if bwd_acts:
            tensors["act_bwd"] = torch.stack(same_device([v for _, _, v in bwd_acts]))
        backward_seen = pend.backward_seen or pend.logits_grad_seen
        with_grad = [(n, p) for n, p in self._named_params if p.grad is not None] if backward_seen else []
        # FSDP2 / DTensor: the norm of this rank's shard (no collective; docs/distributed.md)
        sharded = {n for n, p in with_grad if is_sharded(p.grad)}
        if with_grad:
            norms = torch._foreach_norm([local_tensor(p.grad) for _, p in with_grad], 2, dtype=torch.float32)
            tensors["param_norms"] = torch.stack(same_device(list(norms)))
        for k, v in pend.fwd.items():
            tensors["fwd." + k] = v
        for k, v in pend.grad.items():
            tensors["grad." + k] = v
        host = to_host(tensors)  # the one host sync of this step
        if "batch.input_ids" in host:
            pend.batch = Batch(input_ids=host["batch.input_ids"].long(),
                               attention_mask=host["batch.attention_mask"].long() if "batch.attention_mask" in host else None,
                               labels=host["batch.labels"].long() if "batch.labels" in host else None,
                               labels_source="labels" if "batch.labels" in host else "none")

        rec = StepRecord(step=pend.step, optimizer_step_index=self.optimizer_steps, full=pend.full,
                         backward_seen=backward_seen, scaler_active=self.history.scaler_seen,
                         logits_requires_grad=pend.logits_requires_grad)
        scale = float(host["scale"]) if "scale" in host else None
        rec.loss_scale = scale
        if "model_loss" in host:
            rec.loss, rec.loss_source = float(host["model_loss"]), "model"
        if "backward_loss" in host:
            rec.backward_loss = float(host["backward_loss"])
            if rec.loss is None:
                rec.loss, rec.loss_source = rec.backward_loss, "backward"
        if "supervised" in host:
            rec.supervised_tokens, rec.supervised_source = int(host["supervised"]), "labels"
        if rec.loss_source == "model" and "num_items" in host and rec.supervised_tokens:
            # HF Trainer divides by the supervised tokens of the whole optimizer step (all ranks, all
            # micro-batches): the model's loss is a share that wobbles with this micro-batch's token
            # count. Recorded: the mean over this micro-batch's own tokens (what one process without
            # accumulation logs); the share stays in raw_loss (distributed.merge sums it as Trainer logs)
            rec.raw_loss = rec.loss
            rec.loss = rec.loss * float(host["num_items"]) / rec.supervised_tokens
        if "empty_rows" in host:
            rec.empty_rows = int(host["empty_rows"])

        # parameters and their gradients (cheap: one foreach norm, every step)
        trainable = [(n, p) for n, p in self._named_params if p.requires_grad]
        if backward_seen:
            norm_of = dict(zip((n for n, _ in with_grad), host["param_norms"].tolist())) if with_grad else {}
            finite = [v for v in norm_of.values() if math.isfinite(v)]
            total = math.sqrt(sum(v * v for v in finite)) if len(finite) == len(norm_of) else float("inf")
            if any(math.isnan(v) for v in norm_of.values()):
                total = float("nan")
            rec.grad_norm = total / scale if scale else total
            rec.nonfinite_grad_params = [n for n, v in norm_of.items() if not math.isfinite(v)]
            # a zero shard of a sharded gradient says nothing about the whole gradient: not "zero"
            nonzero = [(n, p) for n, p in trainable if norm_of.get(n, 0.0) != 0.0 or n in sharded]
            numel = sum(p.numel() for _, p in trainable)
            rec.params = {
                "trainable": len(trainable), "trainable_numel": numel,
                "with_grad": sum(1 for n, _ in trainable if n in norm_of),
                "nonzero_grad": len(nonzero), "nonzero_numel": sum(p.numel() for _, p in nonzero),
                "nonzero_share": round(sum(p.numel() for _, p in nonzero) / numel, 4) if numel else 0.0,
                "zero_grad_names": [n for n, _ in trainable if norm_of.get(n, 0.0) == 0.0 and n not in sharded][:20],
            }
            if sharded:
                rec.params["sharded_grads"] = len(sharded)  # grad_norm covers this rank's shards only
        else:
            rec.params = {"trainable": len(trainable), "trainable_numel": sum(p.numel() for _, p in trainable)}
        # what share of the model trains, and whether any weight matrix does (params-frozen: only norms/biases)
        rec.params["total_numel"] = sum(p.numel() for _, p in self._named_params)
        rec.params["trainable_matrix_numel"] = sum(p.numel() for _, p in trainable if p.dim() >= 2)
        if len(trainable) <= 64:
            rec.params["trainable_names"] = [n for n, _ in trainable][:20]
        opt = self._opt_ref() if self._opt_ref is not None else None
        if opt is not None:
            in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
            rec.params["missing_from_optimizer"] = [n for n, p in trainable if id(p) not in in_opt][:20]
            rec.params["missing_from_optimizer_count"] = sum(1 for _, p in trainable if id(p) not in in_opt)
            rec.lr = _lr(opt)
        rec.dtypes = self._dtypes(pend, opt)

        extra = None
        if pend.full:
            rec.activations = self._activation_rows(pend.step, fwd_acts, bwd_acts, host, pend)
            rec.fp16_forecast = _fp16_forecast(rec.activations, pend.step)
            fwd = {k[4:]: v for k, v in host.items() if k.startswith("fwd.")}
            grad = {k[5:]: v for k, v in host.items() if k.startswith("grad.")}
            if pend.batch is not None and fwd and tuple(pend.batch.input_ids.shape) == tuple(fwd["lse"].shape):
                a = analyze_tokens(fwd, grad, pend.batch, self.tokenizer)
                rec.by_class = a["by_class"]
                rec.logits = a.get("logits")
                if rec.logits is not None:
                    rec.logits["dtype"] = pend.logits_dtype
                rec.argmax = a.get("argmax")
                rec.targets = a.get("targets")
                rec.token_weight = a.get("token_weight")
                rec.grad_positions_nonfinite = a.get("grad_positions_nonfinite", 0)
                if a.get("supervised_tokens") is not None:
                    rec.supervised_tokens, rec.supervised_source = a["supervised_tokens"], "gradient"
                extra = {"batch": pend.batch, "extra": a.get("sample_extra") or {}}
        return rec, extra

    def _activation_rows(self, step: int, fwd_acts, bwd_acts, host, pend: _Pending) -> list[dict[str, Any]]:
        def row(name, v, dt, phase):
            return {"module": name, "max_abs": v, "dtype": dtype_name(dt), "limit": dtype_limit(dt),
                    "finite": math.isfinite(v), "phase": phase, "step": step}

        def extreme(*keys):  # max |.| over rows; NaN if any is NaN
            t = torch.stack([host[k].abs() for k in keys]).amax(0)
            return float("nan") if torch.isnan(t).any() else float(t.max())

        rows = []
        for phase, acts, key in (("forward", fwd_acts, "act_fwd"), ("backward", bwd_acts, "act_bwd")):
            vals = host[key].tolist() if acts else []
            if phase == "backward" and "grad.grad_min" in host:  # the logits' gradient comes first in backward
                # |min| is the largest |coordinate| of a cross-entropy gradient row; the norm carries inf/NaN
                rows.append(row(pend.logits_module, extreme("grad.grad_min", "grad.grad_norm") if not
                                torch.isfinite(host["grad.grad_norm"]).all() else extreme("grad.grad_min"),
                                pend.logits_dtype, phase))
            for (name, dt, _), v in zip(acts, vals):
                rows.append(row(name, v, dt, phase))
            if phase == "forward" and "fwd.row_max" in host:  # the logits are the last forward output
                rows.append(row(pend.logits_module, extreme("fwd.row_min", "fwd.row_max"), pend.logits_dtype, phase))
        return rows

    def _dtypes(self, pend: _Pending, opt) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for _, p in self._named_params:
            if p.requires_grad:
                d["param"] = dtype_name(p.dtype)
                break
        if "param" not in d and self._named_params:
            d["param"] = dtype_name(self._named_params[0][1].dtype)
        d["config"] = self.model_info.config_dtype if self.model_info is not None else None
        d["autocast"] = pend.autocast_dtype
        d["logits"] = pend.logits_dtype
        d["compute"] = pend.autocast_dtype or d.get("param")
        if opt is not None:
            zero_eps = []
            for g in opt.param_groups:
                eps = g.get("eps")
                if isinstance(eps, (int, float)) and "betas" in g:
                    fp16 = any(p.dtype == torch.float16 for p in g["params"])
                    if fp16 and float(torch.tensor(eps, dtype=torch.float16)) == 0.0:
                        zero_eps.append(eps)
            d["optimizer"] = type(opt).__name__
            d["adam_eps_fp16_zero"] = zero_eps
        return d

    def record_error(self, where: str = "a step hook", affects: Iterable[str] = ()) -> None:
        """Record the exception being handled as OUR error (never raised into the user's training)."""
        import sys

        exc = sys.exc_info()[1]
        if len(self.errors) < 50:
            self.errors.append(internal.entry(where, exc, affects))


def _unwrap_optimizer(opt):
    """The torch optimizer inside a wrapper (accelerate's AcceleratedOptimizer, ...): the global
    step hooks see the inner one."""
    while opt is not None and hasattr(opt, "optimizer") and opt.optimizer is not opt and hasattr(opt.optimizer, "param_groups"):
        opt = opt.optimizer  # AcceleratedOptimizer subclasses Optimizer but delegates step() to .optimizer
    return opt


def _lr(optimizer) -> float | None:
    try:
        lr = optimizer.param_groups[0].get("lr")
        return float(lr) if lr is not None else None
    except Exception:
        return None


def merge_activations(rows: list[dict]) -> list[dict]:
    """One row per (module, phase): the max over calls (a module may run several times)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["module"], r["phase"])
        old = out.get(key)
        if old is None:
            out[key] = dict(r)
        elif not (old["max_abs"] >= r["max_abs"]):  # NaN-aware: a NaN row wins
            out[key] = dict(r)
    return list(out.values())


def _fp16_forecast(rows: list[dict], step: int) -> dict[str, Any] | None:
    """From a forward in another dtype, which module outputs would not fit fp16 (max 65504)."""
    fwd = [r for r in rows if r["phase"] == "forward" and math.isfinite(r["max_abs"])]
    if not fwd:
        return None
    source = sorted({r["dtype"] for r in fwd})
    overflow = [{"module": r["module"], "max_abs": r["max_abs"]} for r in fwd if r["max_abs"] > FP16_MAX]
    headroom = [{"module": r["module"], "max_abs": r["max_abs"], "ratio": round(r["max_abs"] / FP16_MAX, 4)}
                for r in fwd if FP16_MAX / HEADROOM_FACTOR < r["max_abs"] <= FP16_MAX]
    top = max(fwd, key=lambda r: r["max_abs"])
    return {
        "step": step, "source_dtypes": source, "limit": FP16_MAX, "factor": HEADROOM_FACTOR,
        "safe": not overflow and not headroom, "overflow": _dedupe(overflow)[:20], "headroom": _dedupe(headroom)[:20],
        "max_module": top["module"], "max_abs": top["max_abs"], "max_ratio": round(top["max_abs"] / FP16_MAX, 6),
    }


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        if r["module"] not in seen:
            seen.add(r["module"])
            out.append(r)
    return out
