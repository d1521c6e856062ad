"""`sftdoctor watch train.py`: run the user's unmodified script with sftdoctor attached.

  - the first training forward of a causal LM: the batch probes run on that batch, and the step
    probes are attached to the model (sftdoctor.attach), with the optimizer found in the script;
  - an HF / TRL Trainer: attach(trainer) when train() is called (no callback for the user to add);
  - model.save_pretrained / torch.save of a state dict: the saved weights are checked;
  - model.generate: the outputs are checked (the `!!!!` symptom, never stopping).

The report is always built, however the script ends (completed, crashed, sys.exit, Ctrl-C, or
stopped by --fail-fast / --max-steps), and everything patched is restored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from . import distributed, internal
from .api import inspect_batch
from .attach import STEP_CHECKS
from .context import TokenizerInfo
from .findings import CheckResult, Finding
from .frames import find_in_frames, find_tokenizer, trainer_tokenizer
from .intercept import (ForwardCatcher, capture, close_progress_bars, complete_batch, probe_ready, running_main_globals, trainer_hints)
from .live import LiveView
from .outputs import check_generation_outputs, check_state_dict, generation_format_mismatch
from .patches import ENTRIES, Patches
from .probes import REGISTRY
from .report import Report
from .session import Session
from .runner import StopScript, print_user_traceback, resolve_script, run_script

CHECKPOINT_IDS = ("weights-nonfinite", "tied-weights-mismatch")
GENERATION_IDS = ("generation-degenerate", "generation-never-stops")


@dataclass
class WatchOptions:
    every: int = 50  # full step probes every N optimizer steps (after the first full_steps)
    full_steps: int = 3
    fail_fast: bool = False  # stop the script at the first fail finding
    max_steps: int | None = None  # stop after this many optimizer steps
    ignore: frozenset[str] = frozenset()
    max_length: int | None = None
    step_probes: bool = True  # False: batch probes on the first batch and checkpoint checks only


class Watcher:
    """Everything `watch` attaches to one run of the script, and the report it builds."""

    def __init__(self, options: WatchOptions, view: LiveView | None = None, job: distributed.Job | None = None):
        self.options = options
        self.view = view or LiveView(plain=True, quiet=True)
        self.job = job  # this rank's part in a multi-process job (None: one process)
        self.rank = job.rank if job is not None else distributed.rank()
        self.in_script = False  # True while the user's script runs (a SIGTERM then stops it)
        self.session = Session("watch", REGISTRY, ignore=options.ignore, rank=self.rank)
        self.report = self.session.report
        self.doctors: list[Any] = []
        self._attached: set[int] = set()  # id() of models with a Doctor
        self._batch_done = False
        self._tokenizer: Any = None
        self._tokenizer_info: Any = None
        self._patches = Patches()
        self._catcher = ForwardCatcher(self._on_forward)
        self._script_ns: dict[str, Any] = {}
        self._stopping = False  # once True, callbacks never raise StopScript again
        self._saving = False
        self.optimizer_steps = 0  # steps of any optimizer holding a parameter of a watched model
        self._optimizer_is_ours: dict[int, bool] = {}
        self._trainers: list[Any] = []
        self._batches: Any = None  # BatchStream: cheap batch checks on every training batch
        self._deferred: dict[str, Any] | None = None  # label checks waiting for the gradient (see _resolve_labels)

    # ---- running -------------------------------------------------------------------------------
    def run(self, script: str | None, args: list[str], *, module: str | None = None) -> Report:
        """Run the script with everything attached; return the finished report (report.run says
        how the script ended)."""
        target = resolve_script(script, module)
        if self.rank in (None, 0):  # one start line per job, not one per rank
            self.view.started(module and f"-m {module}" or target)
        self.install()
        try:
            self.in_script = True
            outcome = run_script(script, args, module=module, globals_out=self._script_ns)
        finally:
            self.in_script = False
            self._stopping = True
            try:
                self.finish()
            except Exception as e:  # never lose the restore below to a failure of ours
                internal.add(self.report, internal.entry("building the report", e))
            finally:
                self.uninstall()
                self.view.close()
        if outcome.status in ("crashed", "interrupted") and outcome.exception is not None:
            print_user_traceback(outcome.exception)
        self.report.run.update(outcome.to_run())
        self.report.run["script"] = module or script
        self.report.run["argv"] = [target, *args]
        self.report.run["options"] = {"every": self.options.every, "full_steps": self.options.full_steps,
                                      "fail_fast": self.options.fail_fast, "max_steps": self.options.max_steps,
                                      "step_probes": self.options.step_probes}
        if self.rank is not None:
            self.report.run["rank"] = self.rank
        return self.session.finish()

    def install(self) -> None:
        """Install watch's patches (sftdoctor.patches): the forward catcher, save_pretrained, generate,
        Trainer.train, torch.save, and a global optimizer step post-hook; uninstall() restores them."""
        self._catcher.install(self._patches)
        self._patch_method("save-pretrained", self._after_save_pretrained)
        try:
            self._patch_method("generate", self._after_generate)
        except ImportError:
            pass
        watcher = self

        def make_train(original_train):
            def train(trainer, *args, **kwargs):
                try:
                    watcher._attach_trainer(trainer)
                except Exception as e:  # e.g. a model_init Trainer: attached at its first forward instead
                    internal.add(watcher.report, internal.entry("attaching to the Trainer", e, STEP_CHECKS))
                return original_train(trainer, *args, **kwargs)
            return train

        try:
            self._patches.wrap("trainer-train", make_train)
        except ImportError:
            pass

        def make_save(original_save):
            def save(obj, f, *args, **kwargs):
                result = original_save(obj, f, *args, **kwargs)
                if isinstance(obj, Mapping) and not watcher._saving:
                    where = os.fsdecode(f) if isinstance(f, (str, bytes, os.PathLike)) else "<file object>"
                    try:
                        watcher._check_saved(obj, None, where)
                    except Exception as e:
                        internal.add(watcher.report, internal.entry("checking a torch.save", e, CHECKPOINT_IDS[:1]))
                return result
            return save

        self._patches.wrap("torch-save", make_save)
        self._patches.optimizer_hook("post", self._after_optimizer_step)

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        # counted here, not from the Doctor: a Trainer steps accelerate's wrapper around the optimizer
        ours = self._optimizer_is_ours.get(id(optimizer))
        if ours is None:
            watched = {id(p) for d in self.doctors for p in d.model.parameters()}
            ours = any(id(p) in watched for g in optimizer.param_groups for p in g["params"])
            if watched:
                self._optimizer_is_ours[id(optimizer)] = ours
        if ours:
            self.optimizer_steps += 1

    def uninstall(self) -> None:
        for doctor in self.doctors:
            try:
                doctor.detach()
            except Exception:
                pass
        self._patches.restore()

    def _patch_method(self, entry: str, after) -> None:
        """Patch ENTRIES[entry] so that after(obj, args, kwargs, result) runs once the original returned."""
        name = ENTRIES[entry].attr
        watcher = self

        def make(original):
            def patched(obj, *args, **kwargs):
                result = original(obj, *args, **kwargs)
                if not watcher._saving:
                    try:
                        after(obj, args, kwargs, result)
                    except Exception as e:  # a check of ours failing must not fail the user's save
                        internal.add(watcher.report, internal.entry(
                            f"checking {name}", e, CHECKPOINT_IDS if name == "save_pretrained" else GENERATION_IDS))
                return result

            patched.__wrapped__ = original
            return patched

        self._patches.wrap(entry, make)

    # ---- the first forward, and every forward's cheap check ------------------------------------------
    def _on_forward(self, model, args, kwargs, frame) -> None:
        if self.job is not None and not self._stopping:
            # another rank failed: stop here, before this step's backward enters a collective it will not join
            peer = self.job.stopped_by_peer()
            if peer is not None:
                err = peer.get("error") or {}
                what = f"{err.get('type')}: {err.get('message')}" if err else (peer.get("reason") or "")
                self._stop(f"rank {peer['rank']} {peer.get('status')}" + (f" ({what})" if what else ""))
        if not torch.is_grad_enabled():
            return  # evaluation / generate(): not a training step
        if "num_items_in_batch" in kwargs:  # HF Trainer: the loss is a share of the whole step's (distributed.merge)
            self.report.run["loss_normalized_by"] = "num_items_in_batch"
        if self.options.max_steps is not None and not self._stopping:
            if self.optimizer_steps >= self.options.max_steps:
                self._stop(f"--max-steps {self.options.max_steps} reached")
        if not (self._batch_done and (id(model) in self._attached or not self.options.step_probes)):
            try:
                self._first_forward_of(model, args, kwargs, frame)
            except StopScript:
                raise
            except Exception as e:  # sftdoctor's own failure must never break the user's training
                internal.add(self.report, internal.entry("the first training forward (batch checks, attach)", e,
                                                         [i for p in REGISTRY.at("batch") for i in p.ids]))
        self._every_batch(model, args, kwargs)

    def _every_batch(self, model, args, kwargs) -> None:
        """The cheap batch checks on every training batch (sftdoctor.dataset.BatchStream)."""
        try:
            if self._batches is None:
                from .context import ModelInfo
                from .dataset import BatchStream

                hints = {"max_length": self.options.max_length} if self.options.max_length else {}
                self._batches = BatchStream(self._tokenizer, ModelInfo.from_model(model), hints=hints, ignore=self.options.ignore)
            from .intercept import bind_batch

            self._batches.observe(bind_batch(model, args, kwargs))
        except Exception as e:  # ours: never breaks the user's training
            internal.add(self.report, internal.entry("the every-batch checks", e, [i for p in REGISTRY.at("batch") for i in p.ids]))

    def _first_forward_of(self, model, args, kwargs, frame) -> None:
        script_globals = self._script_ns.get("globals") or running_main_globals()
        fw = capture(model, args, kwargs, frame)
        if self._tokenizer is None:
            self._tokenizer = find_tokenizer(frame, script_globals)
        if id(model) not in self._attached and self.options.step_probes:
            optimizer = find_in_frames(frame, torch.optim.Optimizer, script_globals)
            self._attach(model, self._tokenizer, optimizer=optimizer)
        if not self._batch_done:
            self._batch_done = True
            hints = trainer_hints(frame, script_globals)
            if self.options.max_length:
                hints["max_length"] = self.options.max_length
            self._inspect_first_batch(fw, hints)

    def _inspect_first_batch(self, fw, hints: dict[str, Any]) -> None:
        from .context import ModelInfo

        batch, labels_from = complete_batch(fw)
        if "input_ids" not in batch:
            self.report.run["first_forward"] = {"caller": fw.caller, "model": type(fw.model).__name__,
                                                "note": "no input_ids (inputs_embeds?): batch probes not run"}
            self._batch_done = True
            return
        batch, dropped = probe_ready(batch)
        model_info = ModelInfo.from_model(fw.model)
        if labels_from != "forward" and self.options.step_probes and id(fw.model) in self._attached:
            # The model got no labels: which tensor the loss uses is a guess. The label checks wait for
            # the first measured d loss / d logits (what the loss trained on) and run on that instead.
            guessed = {k: batch.pop(k) for k in ("labels", "loss_mask") if k in batch}
            self._deferred = {"batch": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
                              "guessed": {k: v.detach().cpu() for k, v in guessed.items()}, "labels_from": labels_from,
                              "hints": dict(hints), "model_info": model_info}
            why_missing = {"labels": "needs labels: the model was called without labels; the label checks run on "
                                     "the labels the gradient shows the loss used, once a backward is seen"}
        else:
            why_missing = {}
        # ModelInfo, not the model: the step probes run on the real steps (attach), not on a copy
        first = inspect_batch(batch, self._tokenizer, model_info, hints=hints,
                              ignore=self.options.ignore, command="watch", why_missing=why_missing)
        for f in first.findings:
            f.rank = self.rank
        self.report.record_checks(first.checks)
        self.report.metrics.update(first.metrics)
        self.report.samples = first.samples
        self.report.run["first_forward"] = {"caller": fw.caller, "model": type(fw.model).__name__,
                                            "labels_from": labels_from}
        if dropped:
            self.report.run["first_forward"]["fields_not_checked"] = dropped
        self._add(first.findings)

    # ---- attaching the step probes -------------------------------------------------------------------
    def _attach(self, model, tokenizer, *, optimizer=None, trainer=None) -> None:
        from .attach import attach

        target = trainer if trainer is not None else model
        doctor = attach(target, tokenizer, optimizer=optimizer, every=self.options.every,
                        full_steps=self.options.full_steps, ignore=self.options.ignore,
                        on_finding=self._on_doctor_finding, on_step=self._on_step, command="watch", rank=self.rank)
        self.doctors.append(doctor)
        self._attached.add(id(doctor.model))
        if self._tokenizer_info is None:
            self._tokenizer_info = doctor.tokenizer

    def _attach_trainer(self, trainer) -> None:
        if trainer not in self._trainers:
            self._trainers.append(trainer)
        if id(trainer.model) in self._attached or not self.options.step_probes:
            return
        tokenizer, where = trainer_tokenizer(trainer, self._script_ns.get("globals") or running_main_globals())
        if tokenizer is None:
            tokenizer = self._tokenizer
        elif where != "processing_class":
            self.report.run["tokenizer_from"] = where  # the Trainer had no processing_class
        if self._tokenizer is None:
            self._tokenizer = tokenizer
        self._attach(trainer.model, tokenizer, trainer=trainer)

    # ---- callbacks from the Doctor (safe points: raising here reaches the script) ------------------
    def _on_doctor_finding(self, finding: Finding) -> None:
        self._add([finding])

    def _on_step(self, row: dict[str, Any]) -> None:
        self.view.step(row, self.optimizer_steps)
        if self._deferred is not None and any(d.gradient_labels is not None for d in self.doctors):
            self._resolve_labels()

    def _resolve_labels(self) -> None:
        """Run the deferred label checks: on the labels the gradient measured when a full step has
        one (the guess, if any, is confirmed or withdrawn), else on the guessed labels, said so."""
        from . import internal
        from .context import IGNORE_INDEX, Batch

        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        grad = next((d.gradient_labels for d in self.doctors if d.gradient_labels is not None), None)
        evidence: dict[str, Any] = {"guessed_from": deferred["labels_from"] if deferred["guessed"] else None}
        try:
            guess = None
            if deferred["guessed"]:
                gb = Batch.from_mapping({**deferred["batch"], **deferred["guessed"]})
                guess = gb.labels
            if grad is not None:
                gbatch, labels = grad
                batch = {"input_ids": gbatch.input_ids, "labels": labels}
                if gbatch.attention_mask is not None:
                    batch["attention_mask"] = gbatch.attention_mask
                evidence["decided_by"] = "gradient: the effective targets of d loss / d logits (what the loss trained on)"
                if guess is not None and tuple(guess.shape) == tuple(labels.shape):
                    sup = (guess != IGNORE_INDEX) | (labels != IGNORE_INDEX)
                    agree = float(((guess == labels) & sup).sum()) / max(int(sup.sum()), 1)
                    evidence["agreement"] = round(agree, 4)
                    evidence["guess"] = "confirmed" if agree >= 0.9 else "withdrawn"
                    if agree < 0.9:
                        self.view.note(f"the labels found in {deferred['labels_from']} are not what the loss trains on "
                                       f"(they agree with the gradient on {agree:.0%} of positions): the label checks use "
                                       "what the gradient measured instead")
            elif deferred["guessed"]:
                batch = {**deferred["batch"], **deferred["guessed"]}
                evidence["decided_by"] = ("guess: no backward reached the logits, so the labels found in "
                                          f"{deferred['labels_from']} could not be checked against the gradient")
            else:
                self.report.run["labels_evidence"] = dict(evidence, decided_by="none: no labels and no gradient")
                return
            hints = dict(deferred["hints"], labels_evidence=evidence["decided_by"])
            part = inspect_batch(batch, self._tokenizer, deferred["model_info"], hints=hints,
                                 ignore=self.options.ignore, command="watch")
        except Exception as e:
            internal.add(self.report, internal.entry("the label checks on the measured labels", e,
                                                     [i for p in REGISTRY.at("batch") if "labels" in p.needs for i in p.ids]))
            return
        self.report.run["labels_evidence"] = evidence
        label_ids = {i for p in REGISTRY.at("batch") if "labels" in p.needs for i in p.ids}
        found = [f for f in part.findings if f.id in label_ids]
        for f in found:
            f.rank = self.rank
            f.evidence.setdefault("labels_from", "gradient" if grad is not None else deferred["labels_from"])
        self.report.record_checks(c for c in part.checks if c.id in label_ids)
        if grad is not None and part.samples:
            self.report.samples = part.samples
        self._add(found)

    def _add(self, findings: Iterable[Finding]) -> None:
        new = self.report.add(findings)
        for f in new:
            self.view.finding(f)
        if self.options.fail_fast and not self._stopping:
            fails = [f for f in new if f.severity == "fail"]
            if fails:
                self._stop(f"--fail-fast: {fails[0].id}")

    def _stop(self, reason: str) -> None:
        self._stopping = True
        self.report.run["stopped_by"] = reason
        raise StopScript(reason)

    # ---- saved weights and generations ---------------------------------------------------------------
    def _after_save_pretrained(self, model, args, kwargs, result) -> None:
        where = str(args[0] if args else kwargs.get("save_directory", "?"))
        self._check_saved(model.state_dict(), getattr(model, "config", None), where)

    def _check_saved(self, state: Mapping, config: Any, where: str) -> None:
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            return  # an optimizer state or a mixed dict: not weights
        self._saving = True
        try:
            found = check_state_dict(state, config)
        except Exception as e:
            internal.add(self.report, internal.entry(f"checking the weights saved to {where}", e, CHECKPOINT_IDS))
            return
        finally:
            self._saving = False
        ids = CHECKPOINT_IDS if config is not None else CHECKPOINT_IDS[:1]
        self.view.note(f"checked the weights saved to {where}: " + (", ".join(f.id for f in found) or "finite"))
        self._record_checkpoint_checks(found, ids, "saves", {"path": where, "tensors": len(state)})

    def _after_generate(self, model, args, kwargs, result) -> None:
        prompts = kwargs.get("input_ids", args[0] if args else None)
        sequences = result if isinstance(result, torch.Tensor) else getattr(result, "sequences", None)
        if not isinstance(prompts, torch.Tensor) or not isinstance(sequences, torch.Tensor) or prompts.dim() != 2:
            return
        info = self._tokenizer_info
        if info is None:
            tok = self._tokenizer or find_tokenizer(None, self._script_ns.get("globals") or running_main_globals())
            info = TokenizerInfo.from_tokenizer(tok) if tok is not None else None
        if info is None:
            return
        max_new = kwargs.get("max_new_tokens") or getattr(getattr(model, "generation_config", None), "max_new_tokens", None)
        self._saving = True  # our own forward below must not be taken for a training step
        try:
            nonfinite = self._logits_nonfinite(model, prompts, kwargs.get("attention_mask"))
            found = check_generation_outputs(prompts.tolist(), sequences.tolist(), info, max_new_tokens=max_new,
                                             logits_nonfinite=nonfinite, training=self._training_evidence())
        except Exception as e:
            internal.add(self.report, internal.entry("checking model.generate outputs", e, GENERATION_IDS))
            return
        finally:
            self._saving = False
        ids = GENERATION_IDS
        if self.report.samples:  # trained on one format, generating with another (template-mismatch)

            rows = [[i for i, c in zip(s["ids"], s["classes"]) if c != 3] for s in self.report.samples]
            am = kwargs.get("attention_mask")
            asked = prompts.tolist()
            if isinstance(am, torch.Tensor) and am.shape == prompts.shape:  # left padding is not the prompt
                asked = [[i for i, m in zip(p, a) if m] for p, a in zip(prompts.tolist(), am.tolist())]
            mismatch = generation_format_mismatch(rows, asked, info)
            found = found + ([mismatch] if mismatch else [])
            ids = GENERATION_IDS + ("template-mismatch",)
        self._record_checkpoint_checks(found, ids, "generations", {"prompts": int(prompts.shape[0])})

    def _record_checkpoint_checks(self, found: list, ids, metric: str, entry: dict[str, Any]) -> None:
        """Stamp checkpoint-level findings with the current step and rank, record their checks and
        one metrics entry (report.metrics[metric]), and add them to the report."""
        step = self._micro_step()
        for f in found:
            f.step, f.rank = step, self.rank
        self.report.record_checks(CheckResult(i, _status(found, i), None, "checkpoint") for i in ids)
        self.report.metrics.setdefault(metric, []).append({**entry, "step": step, "findings": [f.id for f in found]})
        self._add(found)

    def _logits_nonfinite(self, model, prompts, attention_mask) -> bool | None:
        try:
            self._catcher.busy = True
            with torch.no_grad():
                logits = model(input_ids=prompts, attention_mask=attention_mask).logits
            return not bool(torch.isfinite(logits[:, -1]).all())
        except Exception:
            return None
        finally:
            self._catcher.busy = False

    def _training_evidence(self) -> dict[str, Any]:
        """What this run says about training so far, for telling an undertrained model from a broken one:
        first/last loss, steps, vocab, and whether the batch checks saw EOS supervised."""
        losses = [r.get("loss") for d in self.doctors for r in d.records if isinstance(r.get("loss"), (int, float))]
        status = {c.id: c.status for c in self.report.checks}
        eos = status.get("labels-eos-missing")
        vocab = next((d.model_info.embedding_rows for d in self.doctors if getattr(d, "model_info", None) is not None), None)
        return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                "steps": self.optimizer_steps or None, "vocab_size": vocab,
                "eos_supervised": {"pass": True, "fail": False}.get(eos),
                "pad_is_eos_masked": status.get("pad-is-eos-masked") == "fail"}

    def _micro_step(self) -> int | None:
        return max((len(d.records) for d in self.doctors), default=None)

    # ---- the end ---------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Collect every Doctor's report into self.report (callbacks can no longer stop anything)."""
        for doctor in self.doctors:
            doctor.on_step = None
            doctor.on_finding = lambda f: None  # run probes at the end: added below, printed once
            try:
                doctor.detach()  # observes a micro-step still pending (e.g. the script died in backward)
                part = doctor.report()
            except Exception as e:
                internal.add(self.report, internal.entry("collecting the step probes' report", e, STEP_CHECKS))
                continue
            for e in part.metrics.get("internal_errors") or []:
                if isinstance(e, dict):
                    internal.add(self.report, e)
            for f in self.session.merge(part, fill=True):
                self.view.finding(f)
        if self._deferred is not None:
            self._resolve_labels()
        for trainer in self._trainers:
            close_progress_bars(trainer)
        if self._batches is not None:
            self._batches.merge_into(self.session)
        self.report.metrics["optimizer_steps"] = max(self.optimizer_steps, self.report.metrics.get("optimizer_steps") or 0)
        if not self._batch_done:
            self.report.run["note"] = "no training forward of a causal LM was seen"


def _status(found: list[Finding], finding_id: str) -> str:
    sev = [f.severity for f in found if f.id == finding_id and f.severity in ("fail", "warn")]
    return "fail" if "fail" in sev else ("warn" if sev else "pass")


def exit_code(report: Report) -> int:
    """The script's exit code when the script failed (exception 1, sys.exit(n) n, Ctrl-C 130),
    else the verdict's code (sftdoctor.verdict: 1 fail, 3 inconclusive, 0 pass/warn)."""
    # several ranks (a merged report): run holds the first failing rank's status (distributed.merge)
    for run in [report.run, *report.run.get("ranks", [])]:
        status, code = run.get("status"), run.get("exit_code") or 0
        if status in ("crashed", "interrupted", "terminated") or (status == "exited" and code != 0):
            return int(code) if isinstance(code, int) and code else 1
    if report.run.get("status") == "incomplete":  # a rank never answered: the job is not known to be sound
        return 1
    from .verdict import exit_code as verdict_code

    return verdict_code(report.verdict)


def watch(script: str | None, args: list[str], *, module: str | None = None, options: WatchOptions | None = None,
          view: LiveView | None = None) -> Report | None:
    """Run the script under watch; return the (rank 0: merged) report, or None on other ranks."""
    job = distributed.Job.start()
    watcher = Watcher(options or WatchOptions(), view, job=job)
    report = watcher.run(script, args, module=module)
    if job is None:
        return report
    merged = job.collect(report)
    if merged is None:
        job.linger()
    else:
        job.written()
    return merged
